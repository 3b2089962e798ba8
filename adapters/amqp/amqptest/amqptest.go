// Package amqptest holds what integration tests on RabbitMQ share.
package amqptest

import (
	"testing"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// DeleteAtEnd deletes queues on the RabbitMQ at url when the test ends,
// whatever they hold; a broker it cannot reach is logged, not failed on.
func DeleteAtEnd(tb testing.TB, url string, queues ...string) {
	tb.Cleanup(func() {
		conn, err := amqp091.Dial(url)
		if err != nil {
			tb.Logf("delete test queues: %v", err)
			return
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			tb.Logf("delete test queues: %v", err)
			return
		}
		for _, q := range queues {
			_, _ = ch.QueueDelete(q, false, false, false)
		}
	})
}
