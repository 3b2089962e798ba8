//go:build integration

package nats

import (
	"context"
	"strings"
	"testing"
	"time"

	nc "github.com/nats-io/nats.go"

	"imcloud/adapters/poisontest"
	"imcloud/pipeline"
)

const poisonPrefix = "imcloud.test.poison."

// TestIntegrationPoisonContract runs the poison admin contract on the
// local NATS JetStream server.
func TestIntegrationPoisonContract(t *testing.T) {
	t.Cleanup(func() { deleteStreamsPrefixed(t, streamName(poisonPrefix)) })
	poisontest.Run(t, poisonPrefix, func(t *testing.T) poisontest.Broker {
		pub, err := NewPublisher(testURL(), nil)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := NewSubscriber(testURL(), 5*time.Second, 16, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = pub.Close(), sub.Close() })
		return poisontest.Broker{
			Publisher: pub, Subscriber: sub, RecordsTime: true,
			Admin: func(t *testing.T, poison string, targets pipeline.ReplayTargets) pipeline.PoisonAdmin {
				a, err := NewPoisonStream(testURL(), poison, targets, nil)
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
			BoundedAdmin: func(t *testing.T, poison string, targets pipeline.ReplayTargets, limits map[string]int64) pipeline.PoisonAdmin {
				a, err := NewPoisonStream(testURL(), poison, targets, Limits(limits))
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
			// A message on the stream's subject without the headers
			// Publisher writes.
			Garbage: func(t *testing.T, poison string) {
				conn, err := nc.Connect(testURL())
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				js, err := conn.JetStream()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := js.Publish(streamName(poison), []byte("\xff\xfe not a message"), nc.Context(context.Background())); err != nil {
					t.Fatal(err)
				}
			},
		}
	})
}

func deleteStreamsPrefixed(t *testing.T, prefix string) {
	conn, err := nc.Connect(testURL())
	if err != nil {
		t.Logf("cleanup: %v", err)
		return
	}
	defer conn.Close()
	js, err := conn.JetStream()
	if err != nil {
		return
	}
	for name := range js.StreamNames() {
		if strings.HasPrefix(name, prefix) {
			_ = js.DeleteStream(name)
		}
	}
}
