// Package nats is the NATS JetStream broker: a work-queue stream per topic,
// consumed through one durable pull consumer that every job shares.
package nats

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wjs "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// consumerName is the durable consumer jobs share; it outlives any one
// subscriber, so a job that stops takes nothing with it.
const consumerName = "imcloud"

// streamName maps a topic to a stream (and its one subject): stream names
// may not contain dots, which imcloud's topics do.
func streamName(topic string) string { return strings.ReplaceAll(topic, ".", "_") }

// streamConfig is a file-backed work queue: a message is removed once a
// consumer acks it, so the stream holds exactly what is not yet delivered.
func streamConfig(name string) jetstream.StreamConfig {
	return jetstream.StreamConfig{Name: name, Subjects: []string{name}, Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage}
}

func connect(url, name string) (*nc.Conn, error) {
	conn, err := nc.Connect(url, nc.Name(name), nc.RetryOnFailedConnect(true), nc.ReconnectWait(time.Second), nc.MaxReconnects(-1))
	if err != nil {
		return nil, fmt.Errorf("connect nats %s: %w", url, err)
	}
	return conn, nil
}

// Publisher publishes to a topic's stream, creating the stream first, and
// returns once JetStream acknowledged each message.
type Publisher struct {
	pub  *wjs.Publisher
	js   jetstream.JetStream
	mu   sync.Mutex
	have map[string]bool
}

// NewPublisher connects a publisher.
func NewPublisher(url string, logger watermill.LoggerAdapter) (*Publisher, error) {
	conn, err := connect(url, "imcloud-publisher")
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	pub, err := wjs.NewPublisher(wjs.PublisherConfig{Conn: conn, Logger: logger, ConfigureStream: streamConfig})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nats publisher: %w", err)
	}
	return &Publisher{pub: pub, js: js, have: map[string]bool{}}, nil
}

// Publish publishes msgs to topic.
func (p *Publisher) Publish(topic string, msgs ...*message.Message) error {
	name := streamName(topic)
	if err := p.ensure(name); err != nil {
		return err
	}
	return p.pub.Publish(name, msgs...)
}

func (p *Publisher) ensure(name string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.have[name] {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p.js.CreateOrUpdateStream(ctx, streamConfig(name)); err != nil {
		return fmt.Errorf("create stream %s: %w", name, err)
	}
	p.have[name] = true
	return nil
}

// Close closes the connection.
func (p *Publisher) Close() error { return p.pub.Close() }

// Subscriber consumes a topic's stream through the shared durable consumer.
type Subscriber struct{ sub *wjs.Subscriber }

// NewSubscriber connects a subscriber. A nacked message is redelivered
// after a second, not at once; one unacked longer than ackWait is
// redelivered to any job (its handler presumed gone), so ackWait must
// exceed the time a job spends retrying one message.
func NewSubscriber(url string, ackWait time.Duration, logger watermill.LoggerAdapter) (*Subscriber, error) {
	conn, err := connect(url, "imcloud-subscriber")
	if err != nil {
		return nil, err
	}
	sub, err := wjs.NewSubscriber(wjs.SubscriberConfig{
		Conn: conn, Logger: logger, AckWaitTimeout: ackWait,
		NakDelay:            wjs.NewStaticDelay(time.Second),
		ConfigureStream:     streamConfig,
		ResourceInitializer: sharedConsumer(ackWait),
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nats subscriber: %w", err)
	}
	return &Subscriber{sub: sub}, nil
}

// sharedConsumer creates the stream and the durable consumer if missing,
// and never deletes the consumer: other jobs are still using it.
func sharedConsumer(ackWait time.Duration) wjs.ResourceInitializer {
	return func(ctx context.Context, js jetstream.JetStream, name string) (jetstream.Consumer, func(context.Context, watermill.LoggerAdapter), error) {
		stream, err := js.CreateOrUpdateStream(ctx, streamConfig(name))
		if err != nil {
			return nil, nil, fmt.Errorf("create stream %s: %w", name, err)
		}
		c, err := stream.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
			Durable: consumerName, AckPolicy: jetstream.AckExplicitPolicy, AckWait: ackWait,
		})
		if err != nil {
			return nil, nil, fmt.Errorf("create consumer on %s: %w", name, err)
		}
		return c, nil, nil
	}
}

// Subscribe consumes topic until ctx ends.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	return s.sub.Subscribe(ctx, streamName(topic))
}

// SubscribeInitialize creates the topic's stream.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	err := s.sub.SubscribeInitialize(streamName(topic))
	if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return nil
	}
	return err
}

// Close stops the subscriptions and closes the connection.
func (s *Subscriber) Close() error { return s.sub.Close() }
