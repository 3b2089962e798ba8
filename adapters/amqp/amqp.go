// Package amqp is the RabbitMQ broker: a durable work queue per topic shared
// by every consumer, persistent messages, and pipelined publisher confirms.
package amqp

import (
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// queueArgs are the arguments every queue is declared with; publisher and
// subscriber must agree on them or RabbitMQ refuses the second declaration.
// Version 2 classic queues write persistent messages with markedly less
// CPU: one queue is one Erlang process, and it bounds confirmed publishes.
func queueArgs() amqp091.Table { return amqp091.Table{"x-queue-version": 2} }

func config(url string) wamqp.Config {
	c := wamqp.NewDurableQueueConfig(url)
	c.Marshaler = marshaler{}
	c.Queue.Arguments = queueArgs()
	return c
}

// NewSubscriber returns a subscriber consuming each topic's durable queue.
func NewSubscriber(url string, logger watermill.LoggerAdapter) (*wamqp.Subscriber, error) {
	sub, err := wamqp.NewSubscriber(config(url), logger)
	if err != nil {
		return nil, fmt.Errorf("connect rabbitmq subscriber: %w", err)
	}
	return sub, nil
}
