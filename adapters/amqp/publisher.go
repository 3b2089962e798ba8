package amqp

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/adapters/internal/settle"
)

// ErrUnavailable is returned while the publisher has no broker connection.
var ErrUnavailable = errors.New("rabbitmq unavailable")

// ErrNacked is returned for a message the broker refused.
var ErrNacked = errors.New("rabbitmq nacked the message")

// Publisher publishes to durable queues and returns once RabbitMQ has
// confirmed each message. Confirms are pipelined: a channel carries many
// unconfirmed messages at once and each caller waits for its own delivery
// tag, so throughput is not bounded by one round trip per message as with
// watermill-amqp's publisher. After the connection drops it reconnects
// with backoff; meanwhile Publish fails fast with ErrUnavailable.
type Publisher struct {
	url     string
	queues  []string
	limits  Limits
	size    int
	logger  watermill.LoggerAdapter
	marshal marshaler

	mu       sync.RWMutex
	conn     *amqp091.Connection
	chans    []*confirmChannel
	declared map[string]bool // queues known to exist on this connection
	closed   bool
	done     chan struct{}
	next     atomic.Uint64
}

// NewPublisher connects, declares the queue of each topic so that nothing
// published is dropped for want of a queue, and opens that many channels
// in confirm mode to spread publishes over. Its queues are unbounded.
func NewPublisher(url string, logger watermill.LoggerAdapter, channels int, topics ...string) (*Publisher, error) {
	return NewBoundedPublisher(url, logger, channels, nil, topics...)
}

// NewBoundedPublisher is NewPublisher declaring queues with limits; a
// publish a full queue refuses fails with ErrQueueFull.
func NewBoundedPublisher(url string, logger watermill.LoggerAdapter, channels int, limits Limits, topics ...string) (*Publisher, error) {
	p := &Publisher{url: url, queues: topics, limits: limits, size: max(channels, 1), logger: logger, done: make(chan struct{})}
	if err := p.connect(); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *Publisher) connect() error {
	conn, err := amqp091.Dial(p.url)
	if err != nil {
		return fmt.Errorf("%w: dial: %w", ErrUnavailable, err)
	}
	if err := declareQueues(conn, p.queues, p.limits, p.logger); err != nil {
		_ = conn.Close()
		return err
	}
	chans := make([]*confirmChannel, 0, p.size)
	for range p.size {
		c, err := openConfirmChannel(conn)
		if err != nil {
			_ = conn.Close()
			return err
		}
		chans = append(chans, c)
	}
	declared := map[string]bool{}
	for _, q := range p.queues {
		declared[q] = true
	}
	p.mu.Lock()
	p.conn, p.chans, p.declared = conn, chans, declared
	p.mu.Unlock()
	closed := conn.NotifyClose(make(chan *amqp091.Error, 1))
	go p.watch(conn, closed)
	return nil
}

// watch reconnects after the connection closes, backing off up to 5s.
func (p *Publisher) watch(conn *amqp091.Connection, closed <-chan *amqp091.Error) {
	select {
	case <-p.done:
		return
	case err := <-closed:
		p.logger.Error("rabbitmq publisher connection lost", err, nil)
	}
	p.mu.Lock()
	if p.conn == conn {
		p.conn, p.chans = nil, nil
	}
	p.mu.Unlock()
	timing := settle.DefaultTiming()
	backoff := timing.NextBackoff(0)
	for {
		if !settle.Hold(p.done, backoff) {
			return
		}
		if err := p.connect(); err != nil {
			backoff = timing.NextBackoff(backoff)
			p.logger.Info("rabbitmq publisher reconnect failed", watermill.LogFields{"err": err.Error(), "retry_in": backoff.String()})
			continue
		}
		p.logger.Info("rabbitmq publisher reconnected", nil)
		return
	}
}

func (p *Publisher) channel() (*confirmChannel, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return nil, errors.New("publisher closed")
	}
	if len(p.chans) == 0 {
		return nil, ErrUnavailable
	}
	return p.chans[p.next.Add(1)%uint64(len(p.chans))], nil
}

// declare makes sure the queue of topic exists: RabbitMQ confirms, then
// drops, a message routed to no queue.
func (p *Publisher) declare(topic string) error {
	p.mu.RLock()
	known, conn := p.declared[topic], p.conn
	p.mu.RUnlock()
	if known {
		return nil
	}
	if conn == nil {
		return ErrUnavailable
	}
	if err := declareQueue(conn, topic, p.limits, p.logger); err != nil {
		return err
	}
	p.mu.Lock()
	if p.conn == conn {
		p.declared[topic] = true
	}
	p.mu.Unlock()
	return nil
}

// Publish publishes msgs to the queue named topic and returns once every
// one is confirmed. The messages are in flight together.
func (p *Publisher) Publish(topic string, msgs ...*message.Message) error {
	if err := p.declare(topic); err != nil {
		return err
	}
	waits := make([]waiter, 0, len(msgs))
	for _, msg := range msgs {
		pub, err := p.marshal.Marshal(msg)
		if err != nil {
			return fmt.Errorf("marshal message %s: %w", msg.UUID, err)
		}
		pub.Timestamp = time.Now()
		c, err := p.channel()
		if err != nil {
			return err
		}
		wait, err := c.publish(msg.Context(), topic, pub)
		if err != nil {
			return err
		}
		waits = append(waits, wait)
	}
	for i, wait := range waits {
		if err := waitConfirm(msgs[i].Context(), wait); err != nil {
			return fmt.Errorf("message %s: %w", msgs[i].UUID, p.refused(topic, err))
		}
	}
	return nil
}

// refused names a nack from a bounded queue for what it is: the queue is
// at its length limit.
func (p *Publisher) refused(queue string, err error) error {
	if n := p.limits[queue]; n > 0 && errors.Is(err, ErrNacked) {
		return fmt.Errorf("%w: %s holds its limit of %d messages: %w", ErrQueueFull, queue, n, err)
	}
	return err
}

// waitConfirm waits for a confirm within ctx and the confirm timeout.
func waitConfirm(ctx context.Context, wait waiter) error {
	confirmTimeout := settle.DefaultTiming().ConfirmTimeout
	wctx, cancel := context.WithTimeout(ctx, confirmTimeout)
	defer cancel()
	err := wait(wctx)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: no confirm within %s", ErrUnavailable, confirmTimeout)
	}
	return err
}

// Close closes the connection; unconfirmed publishes fail.
func (p *Publisher) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	close(p.done)
	if p.conn == nil {
		return nil
	}
	return p.conn.Close()
}

// confirmChannel is one AMQP channel in confirm mode. amqp091 numbers the
// publishes and hands each its own confirmation, so any number of callers
// publish on it at once without a lock of ours: a lock held across the
// publish deadlocks with amqp091 delivering confirmations.
type confirmChannel struct {
	ch *amqp091.Channel
}

func openConfirmChannel(conn *amqp091.Connection) (*confirmChannel, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	return &confirmChannel{ch: ch}, nil
}

// waiter waits for a publish to be confirmed.
type waiter func(ctx context.Context) error

// publish sends one message and returns how to wait for its confirm.
func (c *confirmChannel) publish(ctx context.Context, queue string, pub amqp091.Publishing) (waiter, error) {
	dc, err := c.ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, false, false, pub)
	if err != nil {
		return nil, fmt.Errorf("%w: publish: %w", ErrUnavailable, err)
	}
	return func(ctx context.Context) error {
		select {
		case <-dc.Done():
		case <-ctx.Done():
			return ctx.Err()
		}
		switch {
		case dc.Acked():
			return nil
		case c.ch.IsClosed():
			// Unconfirmed when the channel went: it may or may not
			// have reached the broker, and is not confirmed.
			return fmt.Errorf("%w: channel closed", ErrUnavailable)
		default:
			return ErrNacked
		}
	}, nil
}
