package amqp

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/pipeline"
)

// PoisonQueue lists, replays and purges the messages of a poison queue
// (pipeline.PoisonAdmin). It takes each message off the queue, and acks
// only what it dropped or re-published with a confirm; everything else
// goes back. A message one admin holds is not seen by another until it
// goes back, so admins racing on a message act on it once between them
// (a List racing a Replay or Purge may miss what the other holds).
// A message's key is a digest of its bytes (keyOf): AMQP has no id of its
// own for it.
type PoisonQueue struct {
	url, queue string
	// targets are the topics Replay publishes to, one per message.
	targets pipeline.ReplayTargets
	limits  Limits
	logger  watermill.LoggerAdapter
}

// NewPoisonQueue opens the poison queue named queue, whose messages Replay
// re-publishes to targets (pipeline.ReplayTargets.For picks one per
// message). limits are the queues' length limits, as their publishers
// declare them (a queue that exists keeps its own).
func NewPoisonQueue(url, queue string, targets pipeline.ReplayTargets, limits Limits, logger watermill.LoggerAdapter) (*PoisonQueue, error) {
	if err := targets.Check(); err != nil {
		return nil, fmt.Errorf("poison queue %s: %w", queue, err)
	}
	return &PoisonQueue{url: url, queue: queue, targets: slices.Clone(targets), limits: limits, logger: logger}, nil
}

var _ pipeline.PoisonAdmin = (*PoisonQueue)(nil)

// errPageFull stops each once a page of List is read.
var errPageFull = errors.New("page full")

// List returns up to limit messages after the one keyed after, leaving
// them in the queue. AMQP has no way to read a queue without taking from
// its head: a page after the first takes (unacked, on one channel) every
// message before it too, skipping them, so reading page k holds k pages
// unacked on the server while it runs (the client keeps only the page).
// If the message keyed after is gone (replayed, purged, or taken by a
// consumer of the poison queue), List fails: list from the start again.
// A message taken by another admin meanwhile is not seen.
func (q *PoisonQueue) List(ctx context.Context, after string, limit int) ([]pipeline.Poisoned, bool, error) {
	limit = max(limit, 1)
	var out []pipeline.Poisoned
	more, found := false, after == ""
	err := q.each(ctx, func(p pipeline.Poisoned) (bool, error) {
		switch {
		case !found:
			found = p.Key == after
		case len(out) == limit:
			more = true
			return false, errPageFull
		default:
			out = append(out, p)
		}
		return false, nil
	})
	if err != nil && !errors.Is(err, errPageFull) {
		return nil, false, err
	}
	if !found {
		return nil, false, fmt.Errorf("list %s after %q: %w: no such message in the queue (any more); list from the start", q.queue, after, pipeline.ErrBadKey)
	}
	return out, more, nil
}

// Purge drops the selected messages and returns how many it dropped.
func (q *PoisonQueue) Purge(ctx context.Context, sel pipeline.Selector) (int, error) {
	n := 0
	err := q.each(ctx, func(p pipeline.Poisoned) (bool, error) {
		if !sel(p) {
			return false, nil
		}
		n++
		return true, nil
	})
	return n, err
}

// Replay publishes the selected messages, each to its target, without
// their poison metadata, and removes each from the poison queue once its
// publish is confirmed. Every target is declared first, with its limit,
// so that none is published to before its queue exists. It returns how
// many it replayed to each.
func (q *PoisonQueue) Replay(ctx context.Context, sel pipeline.Selector) (pipeline.Replayed, error) {
	done := pipeline.Replayed{}
	pub, err := NewBoundedPublisher(q.url, q.logger, 1, q.limits, q.targets...)
	if err != nil {
		return done, fmt.Errorf("replay: declare %s: %w", strings.Join(q.targets, ", "), err)
	}
	defer pub.Close()
	var undecodable []string
	err = q.each(ctx, func(p pipeline.Poisoned) (bool, error) {
		if !sel(p) {
			return false, nil
		}
		if p.Undecodable != "" {
			undecodable = append(undecodable, p.Key)
			return false, nil
		}
		to := q.targets.For(p)
		if err := pub.Publish(to, p.Replayable(ctx)); err != nil {
			return false, fmt.Errorf("replay %s to %s: %w", p.Key, to, err)
		}
		done[to]++
		return true, nil
	})
	if err != nil {
		return done, err
	}
	return done, pipeline.LeftUndecodable(undecodable)
}

// decode reads a delivery as the publisher wrote it, keyed by keyOf. One
// without the message UUID header was not written by a Watermill
// publisher: it is described as undecodable.
func decode(d amqp091.Delivery) pipeline.Poisoned {
	key := keyOf(d)
	_, hasUUID := d.Headers[wamqp.DefaultMessageUUIDHeaderKey]
	msg, err := marshaler{}.Unmarshal(d)
	if err == nil && !hasUUID {
		err = fmt.Errorf("no %s header: not written by imcloud's publisher", wamqp.DefaultMessageUUIDHeaderKey)
	}
	if err != nil {
		return pipeline.NewUndecodable(key, d.Body, d.Timestamp, fmt.Errorf("amqp message %s: %w", key, err))
	}
	return pipeline.NewPoisoned(key, msg, d.Timestamp)
}

// keyOf names a delivery by a SHA-256 digest of its headers (the message
// UUID among them), message id, timestamp and body. RabbitMQ gives a
// message no id of its own that stays put across gets, and a delivery
// tag is per channel; the digest is what is left. A publisher can choose
// every byte hashed, so it is unique only as far as messages differ: two
// byte-identical messages share a key, and selecting it selects both,
// which are the same message twice. It cannot make a key equal another
// message's without that message's bytes (128 bits of the digest kept).
func keyOf(d amqp091.Delivery) string {
	h := sha256.New()
	headers, _ := json.Marshal(d.Headers) // map keys sorted: stable
	h.Write(headers)
	fmt.Fprintf(h, "\x00%q\x00%d\x00", d.MessageId, d.Timestamp.UnixNano())
	h.Write(d.Body)
	return "sha256:" + hex.EncodeToString(h.Sum(nil))[:32]
}

// Close releases nothing: each operation opens and closes its own
// connection.
func (q *PoisonQueue) Close() error { return nil }

// each takes every message currently in the queue and calls fn; a message
// fn says to consume is acked, every other one is put back when done. A
// message is never taken twice in one pass: all stay unacked until the end.
// So a Replay or Purge of everything holds the whole queue unacked on one
// channel while it runs (RabbitMQ keeps them; this process keeps none past
// fn): basic.get has no way to page without taking, and putting each back
// at once would hand it to the next get again.
func (q *PoisonQueue) each(ctx context.Context, fn func(pipeline.Poisoned) (consume bool, err error)) error {
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
	if err := declareQueue(conn, q.queue, q.limits, watermill.NopLogger{}); err != nil {
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
		p := decode(d)
		var consume bool
		consume, fnErr = fn(p)
		if consume {
			if err := d.Ack(false); err != nil {
				return fmt.Errorf("ack %s: %w", p.Key, err)
			}
		}
	}
	// Closing the channel returns every unacked message to the queue.
	if fnErr != nil {
		return fnErr
	}
	return ctx.Err()
}

// Depth is how many messages the poison queue holds, ready or not (a
// passive declare's count: messages a consumer holds unacked are not in
// it).
func (q *PoisonQueue) Depth(ctx context.Context) (int64, error) {
	conn, err := amqp091.Dial(q.url)
	if err != nil {
		return 0, fmt.Errorf("%w: dial: %w", ErrUnavailable, err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return 0, fmt.Errorf("open channel: %w", err)
	}
	defer ch.Close()
	if err := declareQueue(conn, q.queue, q.limits, watermill.NopLogger{}); err != nil {
		return 0, fmt.Errorf("poison queue: %w", err)
	}
	st, err := ch.QueueDeclarePassive(q.queue, true, false, false, false, nil)
	if err != nil {
		return 0, fmt.Errorf("inspect %s: %w", q.queue, err)
	}
	return int64(st.Messages), ctx.Err()
}
