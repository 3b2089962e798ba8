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
)

// nackDelay holds a message a handler refused before it goes back to the
// queue, so that a failing message is not redelivered in a hot loop.
const nackDelay = time.Second

// Subscriber consumes durable queues with manual acks. One subscription
// hands out up to prefetch messages at a time, each acked or nacked when
// its handler is done, so a single subscription processes prefetch
// messages concurrently. After the connection drops it reconnects with
// backoff; messages that were unacked then are redelivered by RabbitMQ.
type Subscriber struct {
	url      string
	prefetch int
	limits   Limits
	logger   watermill.LoggerAdapter

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
	return &Subscriber{url: url, prefetch: max(prefetch, 1), limits: limits, logger: logger, closing: make(chan struct{})}, nil
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
	var inflight sync.WaitGroup
	defer func() {
		inflight.Wait()
		close(out)
	}()
	for {
		s.deliver(ctx, out, deliveries, &inflight)
		// Unacked messages go back to the queue with the connection.
		_ = conn.Close()
		if s.stopped(ctx) {
			return
		}
		s.logger.Error("rabbitmq subscription lost; reconnecting", errors.New("delivery channel closed"), watermill.LogFields{"queue": queue})
		var err error
		for backoff := 100 * time.Millisecond; ; backoff = min(backoff*2, 5*time.Second) {
			select {
			case <-ctx.Done():
				return
			case <-s.closing:
				return
			case <-time.After(backoff):
			}
			if conn, deliveries, err = s.consume(queue); err == nil {
				s.logger.Info("rabbitmq subscription resumed", watermill.LogFields{"queue": queue})
				break
			}
		}
	}
}

func (s *Subscriber) stopped(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return true
	case <-s.closing:
		return true
	default:
		return false
	}
}

// deliver passes messages on until the deliveries end or the subscription
// stops. Each message's ack or nack is awaited in its own goroutine: the
// prefetch count, not this loop, bounds how many are in flight.
func (s *Subscriber) deliver(ctx context.Context, out chan<- *message.Message, deliveries <-chan amqp091.Delivery, inflight *sync.WaitGroup) {
	for {
		var d amqp091.Delivery
		select {
		case <-ctx.Done():
			return
		case <-s.closing:
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
			select {
			case out <- msg:
			case <-ctx.Done():
				cancel()
				return
			case <-s.closing:
				cancel()
				return
			}
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer cancel()
			s.settle(ctx, d, msgs)
		}()
	}
}

// settle acks d once every message it carried was acked. If any was
// nacked, d goes back to the queue after nackDelay, all of it: the
// messages already handled come again, and the dedupe middleware drops
// them.
func (s *Subscriber) settle(ctx context.Context, d amqp091.Delivery, msgs []*message.Message) {
	nacked := false
	for _, msg := range msgs {
		select {
		case <-msg.Acked():
		case <-msg.Nacked():
			nacked = true
		case <-ctx.Done():
			return // the connection's close returns d to the queue
		case <-s.closing:
			return
		}
	}
	if !nacked {
		if err := d.Ack(false); err != nil {
			s.logger.Info("ack failed; RabbitMQ will redeliver", watermill.LogFields{"err": err.Error(), "messages": len(msgs)})
		}
		return
	}
	select {
	case <-time.After(nackDelay):
	case <-s.closing:
	case <-ctx.Done():
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
