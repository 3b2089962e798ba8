package amqp

import (
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

func TestMarshalerToleratesBrokerHeaders(t *testing.T) {
	msg := message.NewMessage("uuid-1", []byte("payload"))
	msg.Metadata.Set("message_id", "m1")
	pub, err := marshaler{}.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	if pub.DeliveryMode != amqp091.Persistent {
		t.Fatalf("delivery mode %d, want persistent", pub.DeliveryMode)
	}
	// What RabbitMQ adds to a dead-lettered message.
	pub.Headers["x-death"] = []any{amqp091.Table{"count": int64(1), "reason": "rejected", "time": time.Unix(0, 0)}}
	pub.Headers["x-delivery-count"] = int32(3)

	got, err := marshaler{}.Unmarshal(amqp091.Delivery{Headers: pub.Headers, Body: pub.Body})
	if err != nil {
		t.Fatalf("Unmarshal: %v", err)
	}
	if got.UUID != "uuid-1" || got.Metadata.Get("message_id") != "m1" || string(got.Payload) != "payload" {
		t.Fatalf("round trip lost data: %s %v %q", got.UUID, got.Metadata, got.Payload)
	}
	if !strings.Contains(got.Metadata.Get("x-death"), "rejected") || got.Metadata.Get("x-delivery-count") != "3" {
		t.Fatalf("broker headers not rendered: %v", got.Metadata)
	}
}
