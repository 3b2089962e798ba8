// Package events publishes receipts and presence to the events topic
// (topics.events): connect, disconnect, delivered, offline and acked, one
// JSON message each. It is best-effort by design: an Emitter never slows
// the path that emits (a delivery, a connect, a push's accept) — it queues
// into a bounded buffer and one goroutine publishes; a full buffer or a
// refused publish drops the event, counts it and logs at most once per
// interval. Events that reach the broker are then kept as the broker keeps
// any message (at-least-once to a consumer on a shared broker).
package events

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"imcloud/pipeline"
)

// Kind names an event.
type Kind string

// The event kinds.
const (
	// Connect: a client authenticated on a cloud node and is in its rooms.
	Connect Kind = "connect"
	// Disconnect: a connection that emitted Connect ended; Code and
	// Reason are the close frame the node sent (1000 with no reason when
	// the client left).
	Disconnect Kind = "disconnect"
	// Delivered: a key or mid push was written to one connection's
	// socket (handed to the kernel; not a client receipt).
	Delivered Kind = "delivered"
	// Offline: logic accepted a mid push while none of the user's
	// connections was online (PushResult.offline_mids).
	Offline Kind = "offline"
	// Acked: a client acknowledged a position of its user stream.
	Acked Kind = "acked"
)

// AllKinds lists every kind, in the order the documentation gives them.
func AllKinds() []Kind { return []Kind{Connect, Disconnect, Delivered, Offline, Acked} }

// Valid reports whether k is a known kind.
func (k Kind) Valid() bool { return slices.Contains(AllKinds(), k) }

// Position is a message's place in a stream (pipeline.StreamPos).
type Position struct {
	Stream string `json:"stream"`
	Epoch  string `json:"epoch"`
	Pos    uint64 `json:"pos"`
}

// Event is one event as published (JSON). Fields a kind does not have are
// left out.
type Event struct {
	Kind Kind      `json:"kind"`
	At   time.Time `json:"at"`
	// Node is the cloud node of the connection (connect, disconnect,
	// delivered, acked); empty for offline, which logic emits.
	Node string `json:"node,omitempty"`
	Mid  int64  `json:"mid"`
	Key  string `json:"key,omitempty"`
	// Rooms the connection was in (connect, disconnect).
	Rooms []string `json:"rooms,omitempty"`
	// Code and Reason are the close code and text (disconnect).
	Code   int    `json:"code,omitempty"`
	Reason string `json:"reason,omitempty"`
	// MsgID is the push's msg_id as the push API answered it (delivered,
	// offline).
	MsgID string `json:"msg_id,omitempty"`
	// Op is the pushed operation (delivered, offline).
	Op int32 `json:"op,omitempty"`
	// Position is the message's place in the user's stream (delivered,
	// when the push had one; acked: the acknowledged position).
	Position *Position `json:"position,omitempty"`
}

// Metadata set on every published event, for routing without decoding.
const (
	MetaKind = "kind"
	MetaMid  = "mid"
)

// Emitter queues events and publishes them in order, one goroutine (Run).
// A nil *Emitter emits nothing: a stage holds one whether events are on
// or not.
type Emitter struct {
	pub    message.Publisher
	topic  string
	kinds  map[Kind]bool
	queue  chan Event
	logger *slog.Logger

	dropped atomic.Int64 // buffer full
	failed  atomic.Int64 // the broker refused or failed the publish
	sent    atomic.Int64
	dropLog *pipeline.RateLog
	failLog *pipeline.RateLog
}

// Options configure an Emitter.
type Options struct {
	Publisher message.Publisher
	Topic     string
	// Kinds are the kinds published; others are not even queued.
	Kinds []Kind
	// Buffer bounds the events queued before Run publishes them; past
	// it an event is dropped and counted.
	Buffer int
	Logger *slog.Logger
}

// New returns an emitter; Run must run for events to be published.
func New(o Options) *Emitter {
	kinds := make(map[Kind]bool, len(o.Kinds))
	for _, k := range o.Kinds {
		kinds[k] = true
	}
	return &Emitter{
		pub: o.Publisher, topic: o.Topic, kinds: kinds,
		queue:   make(chan Event, max(o.Buffer, 1)),
		logger:  o.Logger,
		dropLog: pipeline.NewRateLog(o.Logger, slog.LevelWarn, 10*time.Second),
		failLog: pipeline.NewRateLog(o.Logger, slog.LevelWarn, 10*time.Second),
	}
}

// Enabled reports whether events of kind k are published: callers skip
// building an event nobody wants.
func (e *Emitter) Enabled(k Kind) bool { return e != nil && e.kinds[k] }

// Emit queues ev without blocking; At is set when zero. An event of a
// kind that is off, or one that finds the buffer full, is not published
// (the latter counted in Dropped).
func (e *Emitter) Emit(ev Event) {
	if !e.Enabled(ev.Kind) {
		return
	}
	if ev.At.IsZero() {
		ev.At = time.Now().UTC()
	}
	select {
	case e.queue <- ev:
	default:
		n := e.dropped.Add(1)
		e.dropLog.Log("events dropped: the emitter's buffer is full (events.buffer); the broker is slow or down",
			"topic", e.topic, "kind", ev.Kind, "dropped_total", n)
	}
}

// Acked is the emission point of the ack op: the cloud node calls it for
// each cumulative ack a client sends on its user stream.
func (e *Emitter) Acked(node string, mid int64, key string, pos Position) {
	if !e.Enabled(Acked) {
		return
	}
	e.Emit(Event{Kind: Acked, Node: node, Mid: mid, Key: key, Position: &pos})
}

// Run publishes queued events until ctx ends, then publishes what is
// still queued (at most the buffer) and returns.
func (e *Emitter) Run(ctx context.Context) {
	if e == nil {
		return
	}
	for {
		select {
		case ev := <-e.queue:
			e.publish(ev)
		case <-ctx.Done():
			for {
				select {
				case ev := <-e.queue:
					e.publish(ev)
				default:
					return
				}
			}
		}
	}
}

func (e *Emitter) publish(ev Event) {
	body, err := json.Marshal(ev)
	if err != nil {
		// Every field is a plain value: only a bug gets here.
		e.failed.Add(1)
		e.failLog.Log("encode event", "kind", ev.Kind, "err", err)
		return
	}
	id := uuid.NewString()
	msg := message.NewMessage(id, body)
	msg.Metadata.Set(pipeline.MetaMessageID, id)
	msg.Metadata.Set(MetaKind, string(ev.Kind))
	msg.Metadata.Set(MetaMid, strconv.FormatInt(ev.Mid, 10))
	if err := e.pub.Publish(e.topic, msg); err != nil {
		n := e.failed.Add(1)
		e.failLog.Log("events not published: the broker refused them (topics.events_max_length, or the broker is down)",
			"topic", e.topic, "kind", ev.Kind, "failed_total", n, "err", err)
		return
	}
	e.sent.Add(1)
}

// Dropped counts events dropped for a full buffer.
func (e *Emitter) Dropped() int64 {
	if e == nil {
		return 0
	}
	return e.dropped.Load()
}

// Failed counts events the broker did not take.
func (e *Emitter) Failed() int64 {
	if e == nil {
		return 0
	}
	return e.failed.Load()
}

// Sent counts events published.
func (e *Emitter) Sent() int64 {
	if e == nil {
		return 0
	}
	return e.sent.Load()
}

// ParseKinds checks configured kind names.
func ParseKinds(names []string) ([]Kind, error) {
	out := make([]Kind, 0, len(names))
	for _, n := range names {
		k := Kind(n)
		if !k.Valid() {
			return nil, fmt.Errorf("unknown event kind %q (known: connect, disconnect, delivered, offline, acked)", n)
		}
		out = append(out, k)
	}
	return out, nil
}

// Decode reads a published event.
func Decode(body []byte) (Event, error) {
	var ev Event
	if err := json.Unmarshal(body, &ev); err != nil {
		return Event{}, fmt.Errorf("decode event: %w", err)
	}
	return ev, nil
}
