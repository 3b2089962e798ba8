package amqp

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Poisoned is one message in a poison queue.
type Poisoned struct {
	// ID is the message's id (its id metadata, else its UUID).
	ID       string
	UUID     string
	Metadata message.Metadata
	Payload  []byte
	// PoisonedAt is when the message was published to the poison queue.
	PoisonedAt time.Time
}

// PoisonQueue reads and re-drives the messages of a poison queue. It takes
// each message off the queue, and acks only what it dropped or re-published
// with a confirm; everything else goes back.
type PoisonQueue struct {
	url, queue string
	idKey      string
	// MaxLength is the queue's length limit, as its publishers declare
	// it; 0 declares it unbounded (a queue that exists keeps its own).
	MaxLength int64
}

// NewPoisonQueue opens the poison queue named queue; idKey is the metadata
// key holding a message's id.
func NewPoisonQueue(url, queue, idKey string) *PoisonQueue {
	return &PoisonQueue{url: url, queue: queue, idKey: idKey}
}

// Selector picks the messages an operation applies to.
type Selector func(Poisoned) bool

// All selects every message.
func All(Poisoned) bool { return true }

// IDs selects the messages with the given ids.
func IDs(ids ...string) Selector {
	return func(p Poisoned) bool { return slices.Contains(ids, p.ID) }
}

// List returns the messages in the queue, leaving them there.
func (q *PoisonQueue) List(ctx context.Context) ([]Poisoned, error) {
	var out []Poisoned
	err := q.each(ctx, func(p Poisoned) (bool, error) {
		out = append(out, p)
		return false, nil
	})
	return out, err
}

// Purge drops the selected messages and returns how many it dropped.
func (q *PoisonQueue) Purge(ctx context.Context, sel Selector) (int, error) {
	n := 0
	err := q.each(ctx, func(p Poisoned) (bool, error) {
		if !sel(p) {
			return false, nil
		}
		n++
		return true, nil
	})
	return n, err
}

// Replay publishes the selected messages to topic through pub, without
// their poison metadata, and removes each from the poison queue once its
// publish is confirmed. It returns how many it replayed.
func (q *PoisonQueue) Replay(ctx context.Context, sel Selector, pub message.Publisher, topic string, poisonKeys ...string) (int, error) {
	n := 0
	err := q.each(ctx, func(p Poisoned) (bool, error) {
		if !sel(p) {
			return false, nil
		}
		msg := message.NewMessage(p.UUID, p.Payload)
		msg.Metadata = maps.Clone(p.Metadata)
		for _, k := range poisonKeys {
			delete(msg.Metadata, k)
		}
		msg.SetContext(ctx)
		if err := pub.Publish(topic, msg); err != nil {
			return false, fmt.Errorf("replay %s: %w", p.ID, err)
		}
		n++
		return true, nil
	})
	return n, err
}

// each takes every message currently in the queue and calls fn; a message
// fn says to consume is acked, every other one is put back when done. A
// message is never taken twice in one pass: all stay unacked until the end.
func (q *PoisonQueue) each(ctx context.Context, fn func(Poisoned) (consume bool, err error)) error {
	conn, err := amqp091.Dial(q.url)
	if err != nil {
		return fmt.Errorf("%w: dial: %w", ErrUnavailable, err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	defer ch.Close()
	if err := declareQueue(conn, q.queue, Limits{q.queue: q.MaxLength}, watermill.NopLogger{}); err != nil {
		return fmt.Errorf("poison queue: %w", err)
	}
	var fnErr error
	for ctx.Err() == nil && fnErr == nil {
		d, ok, err := ch.Get(q.queue, false)
		if err != nil {
			return fmt.Errorf("get from %s: %w", q.queue, err)
		}
		if !ok {
			break
		}
		msg, err := marshaler{}.Unmarshal(d)
		if err != nil {
			_ = d.Nack(false, true)
			return fmt.Errorf("decode poisoned message: %w", err)
		}
		p := Poisoned{ID: msg.Metadata.Get(q.idKey), UUID: msg.UUID, Metadata: msg.Metadata, Payload: msg.Payload, PoisonedAt: d.Timestamp}
		if p.ID == "" {
			p.ID = msg.UUID
		}
		var consume bool
		consume, fnErr = fn(p)
		if consume {
			if err := d.Ack(false); err != nil {
				return fmt.Errorf("ack %s: %w", p.ID, err)
			}
		}
	}
	// Closing the channel returns every unacked message to the queue.
	if fnErr != nil {
		return fnErr
	}
	return ctx.Err()
}
