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

	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"imcloud/pipeline"
)

const (
	// consumerName is the durable consumer jobs share; it outlives any one
	// subscriber, so a job that stops takes nothing with it.
	consumerName = "imcloud"
	// uuidHeader carries the Watermill message UUID; other headers are
	// its metadata.
	uuidHeader = "Imcloud-Uuid"
	// nackDelay holds a refused message before redelivery, so that a
	// failing message does not loop hot.
	nackDelay = time.Second
	// publishTimeout bounds the wait for JetStream's ack when the message
	// carries no deadline.
	publishTimeout = 10 * time.Second
)

// streamName maps a topic to a stream (and its one subject): stream names
// may not contain dots, which imcloud's topics do.
func streamName(topic string) string { return strings.ReplaceAll(topic, ".", "_") }

// ErrQueueFull is returned for a message a stream refused for holding its
// limit of messages.
var ErrQueueFull = fmt.Errorf("nats stream full: %w", pipeline.ErrQueueFull)

// Limits maps a topic to the most messages its stream holds; a topic not
// listed is unbounded.
type Limits map[string]int64

// streamConfig is a file-backed work queue: a message is removed once a
// consumer acks it, so the stream holds exactly what is not yet delivered.
// At maxMsgs (when positive) it refuses new messages (DiscardNew) rather
// than dropping old ones. There is no MaxAge: an age limit would drop
// undelivered messages without a word. Limits are updated in place on an
// existing stream (CreateOrUpdateStream), so no migration is needed.
func streamConfig(name string, maxMsgs int64) jetstream.StreamConfig {
	cfg := jetstream.StreamConfig{Name: name, Subjects: []string{name}, Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage, MaxMsgs: -1}
	if maxMsgs > 0 {
		cfg.MaxMsgs = maxMsgs
		cfg.Discard = jetstream.DiscardNew
	}
	return cfg
}

// jsStoreFailed is JetStream's error code for a message a stream cannot
// store; with DiscardNew that is a stream at its limits ("maximum
// messages exceeded").
const jsStoreFailed jetstream.ErrorCode = 10077

func connect(url, name string) (*nc.Conn, jetstream.JetStream, error) {
	conn, err := nc.Connect(url, nc.Name(name), nc.RetryOnFailedConnect(true), nc.ReconnectWait(time.Second), nc.MaxReconnects(-1))
	if err != nil {
		return nil, nil, fmt.Errorf("connect nats %s: %w", url, err)
	}
	js, err := jetstream.New(conn)
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return conn, js, nil
}

// streams creates each topic's stream once per process.
type streams struct {
	js     jetstream.JetStream
	limits map[string]int64 // by stream name
	mu     sync.Mutex
	have   map[string]jetstream.Stream
}

func newStreams(js jetstream.JetStream, limits Limits) *streams {
	byName := make(map[string]int64, len(limits))
	for topic, n := range limits {
		byName[streamName(topic)] = n
	}
	return &streams{js: js, limits: byName, have: map[string]jetstream.Stream{}}
}

func (s *streams) get(ctx context.Context, name string) (jetstream.Stream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.have[name]; st != nil {
		return st, nil
	}
	st, err := s.js.CreateOrUpdateStream(ctx, streamConfig(name, s.limits[name]))
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", name, err)
	}
	s.have[name] = st
	return st, nil
}

// Publisher publishes to a topic's stream and returns once JetStream has
// acknowledged (stored) each message.
type Publisher struct {
	conn    *nc.Conn
	js      jetstream.JetStream
	streams *streams
}

// NewPublisher connects a publisher; it creates streams with limits, and a
// publish a full stream refuses fails with ErrQueueFull.
func NewPublisher(url string, limits Limits) (*Publisher, error) {
	conn, js, err := connect(url, "imcloud-publisher")
	if err != nil {
		return nil, err
	}
	return &Publisher{conn: conn, js: js, streams: newStreams(js, limits)}, nil
}

// Publish publishes msgs to topic.
func (p *Publisher) Publish(topic string, msgs ...*message.Message) error {
	name := streamName(topic)
	for _, msg := range msgs {
		ctx, cancel := context.WithTimeout(msg.Context(), publishTimeout)
		err := p.publish(ctx, name, msg)
		cancel()
		if err != nil {
			return err
		}
	}
	return nil
}

func (p *Publisher) publish(ctx context.Context, name string, msg *message.Message) error {
	if _, err := p.streams.get(ctx, name); err != nil {
		return err
	}
	m := nc.NewMsg(name)
	m.Header.Set(uuidHeader, msg.UUID)
	for k, v := range msg.Metadata {
		m.Header.Set(k, v)
	}
	m.Data = msg.Payload
	if _, err := p.js.PublishMsg(ctx, m); err != nil {
		var ae *jetstream.APIError
		if errors.As(err, &ae) && ae.ErrorCode == jsStoreFailed {
			err = fmt.Errorf("%w: %w", ErrQueueFull, err)
		}
		return fmt.Errorf("publish %s to %s: %w", msg.UUID, name, err)
	}
	return nil
}

// Close closes the connection.
func (p *Publisher) Close() error {
	p.conn.Close()
	return nil
}

// Subscriber consumes a topic's stream through the shared durable consumer.
type Subscriber struct {
	conn     *nc.Conn
	streams  *streams
	ackWait  time.Duration
	prefetch int

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// NewSubscriber connects a subscriber. A subscription pulls up to prefetch
// messages ahead and hands each to the router as it arrives, which starts
// its handler at once: what bounds the unacked messages is the consumer's
// MaxAckPending (JetStream's default, 1000, shared by every job). One
// unacked for longer than ackWait is redelivered to any job (its handler
// presumed gone), so ackWait (broker.nats.redeliver_after) must exceed
// job's worst case on one message, which config validation checks
// (config.JobWorstCase).
// Streams it creates get limits, as the publishers to them give them.
func NewSubscriber(url string, ackWait time.Duration, prefetch int, limits Limits) (*Subscriber, error) {
	conn, js, err := connect(url, "imcloud-subscriber")
	if err != nil {
		return nil, err
	}
	return &Subscriber{
		conn: conn, streams: newStreams(js, limits),
		ackWait: ackWait, prefetch: max(prefetch, 1), closing: make(chan struct{}),
	}, nil
}

// SubscribeInitialize creates topic's stream, so that what is published
// before the first subscription is kept.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	_, err := s.streams.get(context.Background(), streamName(topic))
	return err
}

// Subscribe consumes topic until ctx ends or the subscriber closes; then
// the returned channel closes.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	name := streamName(topic)
	st, err := s.streams.get(ctx, name)
	if err != nil {
		return nil, err
	}
	consumer, err := st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: consumerName, AckPolicy: jetstream.AckExplicitPolicy, AckWait: s.ackWait,
	})
	if err != nil {
		return nil, fmt.Errorf("create consumer on %s: %w", name, err)
	}

	out := make(chan *message.Message)
	stop := make(chan struct{})
	msgCtx, cancelMsgs := context.WithCancel(ctx)
	var (
		mu       sync.RWMutex // orders inflight.Add before the final Wait
		stopped  bool
		inflight sync.WaitGroup
	)
	handle := func(m jetstream.Msg) {
		mu.RLock()
		if stopped {
			mu.RUnlock()
			_ = m.Nak()
			return
		}
		inflight.Add(1)
		mu.RUnlock()
		defer inflight.Done()

		msg := message.NewMessage(m.Headers().Get(uuidHeader), m.Data())
		for k, vs := range m.Headers() {
			// Nats-Msg-Id is JetStream's (poison replay dedupes with it).
			if k != uuidHeader && k != jetstream.MsgIDHeader && len(vs) > 0 {
				msg.Metadata.Set(k, vs[0])
			}
		}
		// Each message's context ends when it is settled.
		ctx, cancel := context.WithCancel(msgCtx)
		msg.SetContext(ctx)
		select {
		case out <- msg:
		case <-stop:
			cancel()
			_ = m.Nak()
			return
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer cancel()
			select {
			case <-msg.Acked():
				_ = m.Ack()
			case <-msg.Nacked():
				_ = m.NakWithDelay(nackDelay)
			case <-stop:
				// Unacked, it is redelivered after ackWait.
			}
		}()
	}
	cc, err := consumer.Consume(handle, jetstream.PullMaxMessages(s.prefetch))
	if err != nil {
		cancelMsgs()
		return nil, fmt.Errorf("consume %s: %w", name, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case <-ctx.Done():
		case <-s.closing:
		}
		mu.Lock()
		stopped = true
		close(stop)
		mu.Unlock()
		cc.Stop()
		inflight.Wait()
		cancelMsgs()
		close(out)
	}()
	return out, nil
}

// Close stops every subscription, waits for them, and closes the connection.
func (s *Subscriber) Close() error {
	s.closeOnce.Do(func() { close(s.closing) })
	s.wg.Wait()
	s.conn.Close()
	return nil
}
