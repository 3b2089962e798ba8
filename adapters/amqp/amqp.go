// Package amqp is the RabbitMQ broker: a durable work queue per topic shared
// by every consumer, persistent messages, and pipelined publisher confirms.
package amqp

import (
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// queueArgs are the arguments every queue is declared with; every
// declaration must agree or RabbitMQ refuses the later ones.
// Version 2 classic queues write persistent messages with markedly less
// CPU: one queue is one Erlang process, and it bounds confirmed publishes.
func queueArgs() amqp091.Table { return amqp091.Table{"x-queue-version": 2} }
