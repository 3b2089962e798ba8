// Package amqp is the RabbitMQ broker: a durable work queue per topic shared
// by every consumer, with publisher confirms.
package amqp

import (
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
)

// publishChannels is the size of the publisher's channel pool: without a pool
// watermill-amqp opens a channel per publish.
const publishChannels = 32

func config(url string) wamqp.Config {
	c := wamqp.NewDurableQueueConfig(url)
	c.Publish.ChannelPoolSize = publishChannels
	// logic answers 200 only once RabbitMQ has the message.
	c.Publish.ConfirmDelivery = true
	return c
}

// NewPublisher returns a confirming publisher. It declares the queue of
// every topic in declare first: watermill-amqp's publisher declares only the
// exchange, and RabbitMQ confirms (then drops) messages routed to no queue.
func NewPublisher(url string, logger watermill.LoggerAdapter, declare ...string) (*wamqp.Publisher, error) {
	if len(declare) > 0 {
		sub, err := wamqp.NewSubscriber(config(url), logger)
		if err != nil {
			return nil, fmt.Errorf("connect to rabbitmq to declare queues: %w", err)
		}
		for _, topic := range declare {
			if err := sub.SubscribeInitialize(topic); err != nil {
				_ = sub.Close()
				return nil, fmt.Errorf("declare queue %s: %w", topic, err)
			}
		}
		if err := sub.Close(); err != nil {
			return nil, fmt.Errorf("close declaring connection: %w", err)
		}
	}
	pub, err := wamqp.NewPublisher(config(url), logger)
	if err != nil {
		return nil, fmt.Errorf("connect rabbitmq publisher: %w", err)
	}
	return pub, nil
}

// NewSubscriber returns a subscriber consuming each topic's durable queue.
func NewSubscriber(url string, logger watermill.LoggerAdapter) (*wamqp.Subscriber, error) {
	sub, err := wamqp.NewSubscriber(config(url), logger)
	if err != nil {
		return nil, fmt.Errorf("connect rabbitmq subscriber: %w", err)
	}
	return sub, nil
}
