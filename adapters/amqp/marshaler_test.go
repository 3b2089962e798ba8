package amqp

import (
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
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

// TestOlderBatchesAreRead: a delivery in the batch format this adapter's
// publisher wrote before bundling moved into the pipeline is still read
// as its messages, so a queue an older version filled is consumed.
func TestOlderBatchesAreRead(t *testing.T) {
	body, err := proto.Marshal(&pb.Batch{Messages: []*pb.Envelope{
		{Uuid: "a", Metadata: map[string]string{"message_id": "a"}, Payload: []byte("1")},
		{Uuid: "b", Payload: []byte("2")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := unbatch(amqp091.Delivery{ContentType: batchContentType, Body: body})
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || msgs[0].UUID != "a" || msgs[0].Metadata.Get("message_id") != "a" || string(msgs[1].Payload) != "2" {
		t.Fatalf("read %v", msgs)
	}
	if _, err := unbatch(amqp091.Delivery{ContentType: batchContentType, Body: []byte{0xff}}); err == nil {
		t.Fatal("a batch that does not decode was read")
	}
}
