package amqp

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/adapters/internal/settle"
)

// Subscriber consumes durable queues with manual acks. One subscription
// hands out up to prefetch messages at a time, each acked or nacked when
// its handler is done, so a single subscription processes prefetch
// messages concurrently. A nacked delivery is requeued after
// settle.Timing.NackDelay; one unsettled for AckTimeout is requeued for
// another job, its handler presumed gone (RabbitMQ's own consumer_timeout,
// 30 min by default, would close the whole channel instead). After the
// connection drops it reconnects with backoff; messages that were unacked
// then are redelivered by RabbitMQ.
type Subscriber struct {
	url      string
	prefetch int
	limits   Limits
	logger   watermill.LoggerAdapter
	timing   settle.Timing

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// NewSubscriber checks that RabbitMQ answers and returns a subscriber.
// It declares a queue it does not find without limits: one that exists
// keeps its own.
func NewSubscriber(url string, logger watermill.LoggerAdapter, prefetch int) (*Subscriber, error) {
	return NewBoundedSubscriber(url, logger, prefetch, nil)
}

// NewBoundedSubscriber is NewSubscriber declaring queues with limits, as
// the publishers to them do.
func NewBoundedSubscriber(url string, logger watermill.LoggerAdapter, prefetch int, limits Limits) (*Subscriber, error) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		return nil, fmt.Errorf("%w: dial: %w", ErrUnavailable, err)
	}
	_ = conn.Close()
	return &Subscriber{url: url, prefetch: max(prefetch, 1), limits: limits, logger: logger, timing: settle.DefaultTiming(), closing: make(chan struct{})}, nil
}

// SetAckTimeout sets how long a delivery may stay unsettled before it is
// given back to the queue (broker.amqp.redeliver_after); call it before
// Subscribe. 0 keeps the default.
func (s *Subscriber) SetAckTimeout(d time.Duration) {
	if d > 0 {
		s.timing.AckTimeout = d
	}
}

// Subscribe consumes the queue named topic (declaring it) until ctx ends
// or the subscriber closes; then the returned channel closes.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	conn, deliveries, err := s.consume(topic)
	if err != nil {
		return nil, err
	}
	out := make(chan *message.Message)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.run(ctx, topic, out, conn, deliveries)
	}()
	return out, nil
}

func (s *Subscriber) consume(queue string) (*amqp091.Connection, <-chan amqp091.Delivery, error) {
	conn, err := amqp091.Dial(s.url)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: dial: %w", ErrUnavailable, err)
	}
	err = declareQueue(conn, queue, s.limits, s.logger)
	var ch *amqp091.Channel
	if err == nil {
		ch, err = conn.Channel()
	}
	if err == nil {
		err = ch.Qos(s.prefetch, 0, false)
	}
	var deliveries <-chan amqp091.Delivery
	if err == nil {
		deliveries, err = ch.Consume(queue, "", false, false, false, false, nil)
	}
	if err != nil {
		_ = conn.Close()
		return nil, nil, fmt.Errorf("consume %s: %w", queue, err)
	}
	return conn, deliveries, nil
}

// run hands deliveries out, reconnecting whenever the connection drops.
func (s *Subscriber) run(ctx context.Context, queue string, out chan<- *message.Message, conn *amqp091.Connection, deliveries <-chan amqp091.Delivery) {
	flight := settle.Start(ctx, s.closing)
	defer func() {
		flight.Wait()
		close(out)
	}()
	for {
		s.deliver(ctx, out, deliveries, flight)
		// Unacked messages go back to the queue with the connection.
		_ = conn.Close()
		if stopped(flight) {
			return
		}
		s.logger.Error("rabbitmq subscription lost; reconnecting", errors.New("delivery channel closed"), watermill.LogFields{"queue": queue})
		var err error
		for backoff := s.timing.NextBackoff(0); ; backoff = s.timing.NextBackoff(backoff) {
			if !settle.Hold(flight.Stopping(), backoff) {
				return
			}
			if conn, deliveries, err = s.consume(queue); err == nil {
				s.logger.Info("rabbitmq subscription resumed", watermill.LogFields{"queue": queue})
				break
			}
		}
	}
}

func stopped(f *settle.Flight) bool {
	select {
	case <-f.Stopping():
		return true
	default:
		return false
	}
}

// deliver passes messages on until the deliveries end or the subscription
// stops. Each delivery's outcome is awaited in its own goroutine: the
// prefetch count, not this loop, bounds how many are in flight.
func (s *Subscriber) deliver(ctx context.Context, out chan<- *message.Message, deliveries <-chan amqp091.Delivery, flight *settle.Flight) {
	for {
		var d amqp091.Delivery
		select {
		case <-flight.Stopping():
			return
		case dd, ok := <-deliveries:
			if !ok {
				return
			}
			d = dd
		}
		msgs, err := unbatch(d)
		if err != nil {
			// It can never be decoded; requeueing it would loop forever.
			s.logger.Error("rejecting undecodable message", err, watermill.LogFields{"delivery_tag": d.DeliveryTag})
			_ = d.Reject(false)
			continue
		}
		msgCtx, cancel := context.WithCancel(ctx)
		for _, msg := range msgs {
			msg.SetContext(msgCtx)
		}
		flight.Settle(cancel, s.timing, msgs, func(o settle.Outcome) { s.settle(flight, d, len(msgs), o) })
		for _, msg := range msgs {
			select {
			case out <- msg:
			case <-flight.Stopping():
				return
			}
		}
	}
}

// settle acks d once every message it carried was acked. If any was
// nacked, d goes back to the queue after NackDelay, all of it: the
// messages already handled come again, and the dedupe middleware drops
// them. If the subscription stops first, d goes back at once (the
// connection's close would return it too).
func (s *Subscriber) settle(flight *settle.Flight, d amqp091.Delivery, msgs int, o settle.Outcome) {
	switch o {
	case settle.Acked:
		if err := d.Ack(false); err != nil {
			s.logger.Info("ack failed; RabbitMQ will redeliver", watermill.LogFields{"err": err.Error(), "messages": msgs})
		}
		return
	case settle.Nacked:
		settle.Hold(flight.Stopping(), s.timing.NackDelay)
	case settle.TimedOut:
		s.logger.Error("message unsettled past the ack timeout; requeueing it for another job", errors.New(o.String()),
			watermill.LogFields{"ack_timeout": s.timing.AckTimeout.String(), "messages": msgs})
	case settle.Stopped:
	}
	_ = d.Nack(false, true)
}

// SubscribeInitialize declares the queue of topic, so that messages
// published before the first Subscribe are kept.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	conn, err := amqp091.Dial(s.url)
	if err != nil {
		return fmt.Errorf("%w: dial: %w", ErrUnavailable, err)
	}
	defer conn.Close()
	return declareQueue(conn, topic, s.limits, s.logger)
}

// Close stops every subscription and waits for them.
func (s *Subscriber) Close() error {
	s.closeOnce.Do(func() { close(s.closing) })
	s.wg.Wait()
	return nil
}
