//go:build integration

package nats

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"

	"imcloud/adapters/pubsubtest"
)

func testURL() string {
	if u := os.Getenv("IMCLOUD_TEST_NATS_URL"); u != "" {
		return u
	}
	return nc.DefaultURL
}

// TestIntegrationUniversalPubSub runs Watermill's Pub/Sub test suite
// against the adapter on the local NATS JetStream server.
func TestIntegrationUniversalPubSub(t *testing.T) {
	t.Cleanup(func() { deleteStreams(t) })
	pubsubtest.Run(t, func(t *testing.T) (message.Publisher, message.Subscriber) {
		pub, err := NewPublisher(testURL(), nil)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := NewSubscriber(testURL(), 5*time.Second, 16, nil)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	})
}

func deleteStreams(t *testing.T) {
	conn, err := nc.Connect(testURL())
	if err != nil {
		return
	}
	defer conn.Close()
	js, err := conn.JetStream()
	if err != nil {
		return
	}
	for name := range js.StreamNames() {
		if strings.HasPrefix(name, streamName(pubsubtest.Prefix)) {
			_ = js.DeleteStream(name)
		}
	}
}
