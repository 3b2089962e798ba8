//go:build integration

package nats

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
	nc "github.com/nats-io/nats.go"
)

func testURL() string {
	if u := os.Getenv("IMCLOUD_TEST_NATS_URL"); u != "" {
		return u
	}
	return nc.DefaultURL
}

const prefix = "imcloud.universal."

// TestIntegrationUniversalPubSub runs Watermill's Pub/Sub test suite
// against the adapter on the local NATS JetStream server.
func TestIntegrationUniversalPubSub(t *testing.T) {
	t.Cleanup(func() { deleteStreams(t) })
	features := tests.Features{
		ConsumerGroups:      false,
		ExactlyOnceDelivery: false,
		GuaranteedOrder:     false,
		Persistent:          true,
		GenerateTopicFunc:   func(tctx tests.TestContext) string { return prefix + string(tctx.TestID) },
	}
	tests.TestPubSub(t, features, func(t *testing.T) (message.Publisher, message.Subscriber) {
		pub, err := NewPublisher(testURL())
		if err != nil {
			t.Fatal(err)
		}
		sub, err := NewSubscriber(testURL(), 5*time.Second, 16)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	}, nil)
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
		if strings.HasPrefix(name, streamName(prefix)) {
			_ = js.DeleteStream(name)
		}
	}
}
