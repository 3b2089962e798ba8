//go:build integration

package amqp

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/adapters/pubsubtest"
)

// TestIntegrationUniversalPubSub runs Watermill's Pub/Sub test suite
// against our publisher and subscriber on the local RabbitMQ, with and
// without coalescing.
func TestIntegrationUniversalPubSub(t *testing.T) {
	t.Cleanup(func() { deleteQueues(t, pubsubtest.Prefix) })
	for _, coalesce := range []bool{false, true} {
		t.Run(fmt.Sprintf("coalesce=%v", coalesce), func(t *testing.T) {
			pubsubtest.Run(t, func(t *testing.T) (message.Publisher, message.Subscriber) {
				logger := watermill.NopLogger{}
				pub, err := NewPublisher(testURL(), logger, 4)
				if err != nil {
					t.Fatal(err)
				}
				if coalesce {
					pub.Coalesce(func(string) bool { return true })
				}
				sub, err := NewSubscriber(testURL(), logger, 16)
				if err != nil {
					t.Fatal(err)
				}
				return pub, sub
			})
		})
	}
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
