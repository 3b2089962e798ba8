// Package nats is the NATS JetStream broker: a work-queue stream per topic,
// consumed through one durable pull consumer that every job shares.
//
// Publisher and Subscriber are ours, not watermill-nats': its jetstream
// subscriber closes its output channel (consumer.go, monitor) while a
// Consume callback may still send on it (message_handler.go), a data race
// watermill-nats PR #18 ("jetstream: fix test_race failures", open since
// 2023-11) reports and that Watermill's universal Pub/Sub suite hit here
// under -race (commit d6709b8). Ours counts each hand-out in flight and
// closes the channel only after the last (settle.Flight); the universal
// suite passes under -race. No throughput was measured against upstream:
// the reason is the race, not speed.
//
// The subscriber's waits for acks, nack delay and drain on close are
// adapters/internal/settle's, shared with the AMQP adapter.
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

	"imcloud/adapters/internal/settle"
	"imcloud/pipeline"
)

const (
	// consumerName is the durable consumer jobs share; it outlives any one
	// subscriber, so a job that stops takes nothing with it.
	consumerName = "imcloud"
	// uuidHeader carries the Watermill message UUID; other headers are
	// its metadata.
	uuidHeader = "Imcloud-Uuid"
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
	// Reconnects back off as the other adapters' do (settle.Timing),
	// rather than the client's fixed 2 s wait.
	timing := settle.DefaultTiming()
	reconnectDelay := func(attempts int) time.Duration {
		d := timing.NextBackoff(0)
		for range min(attempts, 32) - 1 {
			d = timing.NextBackoff(d)
		}
		return d
	}
	conn, err := nc.Connect(url, nc.Name(name), nc.RetryOnFailedConnect(true), nc.CustomReconnectDelay(reconnectDelay), nc.MaxReconnects(-1))
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
		// JetStream's ack of the publish, bounded when the message
		// carries no deadline.
		ctx, cancel := context.WithTimeout(msg.Context(), settle.DefaultTiming().ConfirmTimeout)
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
// A refused message is redelivered after settle.Timing.NackDelay; one
// unsettled at AckWait is redelivered by JetStream to any job, and its
// context ends here; when a subscription stops, the messages it still has
// unsettled are naked, so they are redelivered at once, not after AckWait.
type Subscriber struct {
	conn     *nc.Conn
	streams  *streams
	timing   settle.Timing // AckTimeout is the consumer's AckWait
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
	timing := settle.DefaultTiming()
	timing.AckTimeout = ackWait
	return &Subscriber{
		conn: conn, streams: newStreams(js, limits),
		timing: timing, prefetch: max(prefetch, 1), closing: make(chan struct{}),
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
		Durable: consumerName, AckPolicy: jetstream.AckExplicitPolicy, AckWait: s.timing.AckTimeout,
	})
	if err != nil {
		return nil, fmt.Errorf("create consumer on %s: %w", name, err)
	}

	out := make(chan *message.Message)
	flight := settle.Start(ctx, s.closing)
	handle := func(m jetstream.Msg) {
		// Counted in flight while it may send on out, so that out is not
		// closed under it (watermill-nats PR #18).
		if !flight.Enter() {
			_ = m.Nak()
			return
		}
		defer flight.Leave()

		msg := message.NewMessage(m.Headers().Get(uuidHeader), m.Data())
		for k, vs := range m.Headers() {
			// Nats-Msg-Id is JetStream's (poison replay dedupes with it).
			if k != uuidHeader && k != jetstream.MsgIDHeader && len(vs) > 0 {
				msg.Metadata.Set(k, vs[0])
			}
		}
		// Each message's context ends when it is settled.
		msgCtx, cancel := context.WithCancel(ctx)
		msg.SetContext(msgCtx)
		flight.Settle(cancel, s.timing, []*message.Message{msg}, func(o settle.Outcome) { settleMsg(m, s.timing, o) })
		select {
		case out <- msg:
		case <-flight.Stopping():
		}
	}
	cc, err := consumer.Consume(handle, jetstream.PullMaxMessages(s.prefetch))
	if err != nil {
		flight.Stop()
		return nil, fmt.Errorf("consume %s: %w", name, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		<-flight.Stopping()
		cc.Stop()
		flight.Wait()
		close(out)
	}()
	return out, nil
}

// settleMsg acks or naks m at JetStream as its message's outcome says.
func settleMsg(m jetstream.Msg, t settle.Timing, o settle.Outcome) {
	switch o {
	case settle.Acked:
		_ = m.Ack()
	case settle.Nacked:
		// JetStream holds it for the delay itself.
		_ = m.NakWithDelay(t.NackDelay)
	case settle.TimedOut:
		// JetStream redelivers it on its own at AckWait, to any job.
	case settle.Stopped:
		// Handed back at once rather than after AckWait.
		_ = m.Nak()
	}
}

// Close stops every subscription, waits for them, and closes the connection.
func (s *Subscriber) Close() error {
	s.closeOnce.Do(func() { close(s.closing) })
	s.wg.Wait()
	s.conn.Close()
	return nil
}
