//go:build integration

package amqp

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/adapters/pubsubtest"
)

// TestIntegrationUniversalPubSub runs Watermill's Pub/Sub test suite
// against our publisher and subscriber on the local RabbitMQ.
func TestIntegrationUniversalPubSub(t *testing.T) {
	t.Cleanup(func() { deleteQueues(t, pubsubtest.Prefix) })
	pubsubtest.Run(t, func(t *testing.T) (message.Publisher, message.Subscriber) {
		logger := watermill.NopLogger{}
		pub, err := NewPublisher(testURL(), logger, 4)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := NewSubscriber(testURL(), logger, 16)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	})
}

// deleteQueues deletes the queues whose names start with prefix.
func deleteQueues(t *testing.T, prefix string) {
	out, err := exec.Command("rabbitmqctl", "-q", "list_queues", "name").Output()
	if err != nil {
		t.Logf("list queues: %v", err)
		return
	}
	conn, err := amqp091.Dial(testURL())
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	for _, name := range strings.Fields(string(out)) {
		if strings.HasPrefix(name, prefix) {
			_, _ = ch.QueueDelete(name, false, false, false)
		}
	}
}
