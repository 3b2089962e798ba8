//go:build integration

package amqp

import (
	"context"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/adapters/poisontest"
	"imcloud/pipeline"
)

const poisonPrefix = "imcloud.test.poison."

// TestIntegrationPoisonContract runs the poison admin contract on the
// local RabbitMQ.
func TestIntegrationPoisonContract(t *testing.T) {
	t.Cleanup(func() { deleteQueues(t, poisonPrefix) })
	poisontest.Run(t, poisonPrefix, func(t *testing.T) poisontest.Broker {
		pub, err := NewPublisher(testURL(), watermill.NopLogger{}, 2)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := NewSubscriber(testURL(), watermill.NopLogger{}, 16)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = pub.Close(), sub.Close() })
		return poisontest.Broker{
			// RabbitMQ's timestamp property is in seconds.
			Publisher: pub, Subscriber: sub, RecordsTime: true,
			Admin: func(t *testing.T, poison string, targets pipeline.ReplayTargets) pipeline.PoisonAdmin {
				a, err := NewPoisonQueue(testURL(), poison, targets, nil, watermill.NopLogger{})
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
			BoundedAdmin: func(t *testing.T, poison string, targets pipeline.ReplayTargets, limits map[string]int64) pipeline.PoisonAdmin {
				a, err := NewPoisonQueue(testURL(), poison, targets, Limits(limits), watermill.NopLogger{})
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
			// A body with none of the headers Watermill's marshaler writes.
			Garbage: func(t *testing.T, poison string) {
				conn, err := amqp091.Dial(testURL())
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if err := declareQueue(conn, poison, nil, watermill.NopLogger{}); err != nil {
					t.Fatal(err)
				}
				ch, err := conn.Channel()
				if err != nil {
					t.Fatal(err)
				}
				defer ch.Close()
				if err := ch.Confirm(false); err != nil {
					t.Fatal(err)
				}
				conf, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), "", poison, true, false, amqp091.Publishing{Body: []byte("\xff\xfe not a message")})
				if err != nil {
					t.Fatal(err)
				}
				if ok, err := conf.WaitContext(context.Background()); !ok || err != nil {
					t.Fatalf("garbage not confirmed: %v %v", ok, err)
				}
			},
		}
	})
}
