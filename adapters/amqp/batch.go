package amqp

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

// batchContentType marks an AMQP message that carries several messages.
const batchContentType = "application/vnd.imcloud.batch+protobuf"

// maxBatch bounds how many messages one AMQP message carries.
const maxBatch = 256

// coalescer gathers concurrent publishes to one topic into batch messages.
// There is no timer: a publish finding no sender starts one, and what
// arrives while a batch is out waiting for its confirm goes in the next.
// At low load every message goes alone at once; under load RabbitMQ sees a
// fraction of the messages, which is what bounds confirmed throughput: its
// queue process spends the same CPU on a message of one push as of many.
type coalescer struct {
	p       *Publisher
	topic   string
	senders int

	mu      sync.Mutex
	queue   []*queued
	running int
}

type queued struct {
	env  *pb.Envelope
	done chan error
}

func (c *coalescer) publish(msg *message.Message) waiter {
	q := &queued{env: &pb.Envelope{Uuid: msg.UUID, Metadata: msg.Metadata, Payload: msg.Payload}, done: make(chan error, 1)}
	c.mu.Lock()
	c.queue = append(c.queue, q)
	start := c.running < c.senders
	if start {
		c.running++
	}
	c.mu.Unlock()
	if start {
		go c.send()
	}
	return func(ctx context.Context) error {
		select {
		case err := <-q.done:
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// send publishes what is queued, batch after batch, until nothing is.
func (c *coalescer) send() {
	for {
		c.mu.Lock()
		if len(c.queue) == 0 {
			c.running--
			c.mu.Unlock()
			return
		}
		n := min(len(c.queue), maxBatch)
		batch := c.queue[:n:n]
		c.queue = c.queue[n:]
		c.mu.Unlock()

		err := c.sendBatch(batch)
		for _, q := range batch {
			q.done <- err
		}
	}
}

func (c *coalescer) sendBatch(batch []*queued) error {
	b := &pb.Batch{Messages: make([]*pb.Envelope, len(batch))}
	for i, q := range batch {
		b.Messages[i] = q.env
	}
	body, err := proto.Marshal(b)
	if err != nil {
		return fmt.Errorf("marshal batch: %w", err)
	}
	ch, err := c.p.channel()
	if err != nil {
		return err
	}
	wait, err := ch.publish(context.Background(), c.topic, amqp091.Publishing{
		ContentType: batchContentType, DeliveryMode: amqp091.Persistent, Timestamp: time.Now(), Body: body,
	})
	if err != nil {
		return err
	}
	return c.p.refused(c.topic, waitConfirm(context.Background(), wait))
}

// unbatch returns the messages a delivery carries: those of a batch, or
// the delivery itself.
func unbatch(d amqp091.Delivery) ([]*message.Message, error) {
	if d.ContentType != batchContentType {
		msg, err := marshaler{}.Unmarshal(d)
		if err != nil {
			return nil, err
		}
		return []*message.Message{msg}, nil
	}
	var b pb.Batch
	if err := proto.Unmarshal(d.Body, &b); err != nil {
		return nil, fmt.Errorf("decode batch: %w", err)
	}
	msgs := make([]*message.Message, len(b.Messages))
	for i, e := range b.Messages {
		m := message.NewMessage(e.Uuid, e.Payload)
		if e.Metadata != nil {
			m.Metadata = e.Metadata
		}
		msgs[i] = m
	}
	return msgs, nil
}
