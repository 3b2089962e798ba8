//go:build integration

package e2e

import (
	"net/url"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/pipeline/events"
)

// TestIntegrationEventsOnAMQP: with events on, the events queue exists
// (bounded) before any event, and an offline push's event lands in it as
// one JSON message.
func TestIntegrationEventsOnAMQP(t *testing.T) {
	topic := uniq("imcloud.test") + ".events"
	conn, err := amqp091.Dial(amqpURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	t.Cleanup(func() {
		c, err := conn.Channel()
		if err == nil {
			_, _ = c.QueueDelete(topic, false, false, false)
			_ = c.Close()
		}
	})
	h := start(t, append(amqpTopics(t), "events.enabled=true", "topics.events="+topic, "topics.events_max_length=500")...)

	q, err := ch.QueueDeclarePassive(topic, true, false, false, false, nil)
	if err != nil {
		t.Fatalf("events queue not declared at start: %v", err)
	}
	if q.Messages != 0 {
		t.Fatalf("events queue holds %d messages before any event", q.Messages)
	}
	rep := h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"42"}}, body: "x"})
	id := msgID(t, rep)

	deadline := time.Now().Add(wait)
	for {
		d, ok, err := ch.Get(topic, true)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			ev, err := events.Decode(d.Body)
			if err != nil {
				t.Fatal(err)
			}
			if ev.Kind != events.Offline || ev.Mid != 42 || ev.MsgID != id {
				t.Fatalf("event %+v, want offline of mid 42, msg %s", ev, id)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no event in the events queue")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
