package pipeline

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
)

// Poisoned is one message in a poison topic: a message job gave up on,
// with the reason the poison middleware wrote beside it.
type Poisoned struct {
	// Key is the broker's own name for the entry, unique in the poison
	// topic and not set by whoever published the message: a Redis stream
	// entry id, a JetStream sequence, the embedded broker's sequence. AMQP
	// has none: there it is a digest of the message's headers and body
	// (its UUID among them), so only byte-identical messages share one.
	// Select by Key (Keys): ID is the publisher's to choose.
	Key string
	// ID is the message's id (its MetaMessageID metadata, else its UUID).
	// Any publisher sets it and nothing makes it unique: it is for reading,
	// and selecting by it (ResolveIDs) refuses an id that names two.
	ID       string
	UUID     string
	Metadata message.Metadata
	Payload  []byte
	// PoisonedAt is when the message was published to the poison topic;
	// zero where the broker does not record it.
	PoisonedAt time.Time
	// Undecodable, when not empty, says why the entry could not be read as
	// a message of the adapter's encoding (something else wrote to the
	// topic). ID is then the broker's own name for the entry and Payload
	// its raw bytes, so an operator can see it and purge it; it is never
	// replayed.
	Undecodable string
}

// ErrUndecodable is returned by Replay when it selected entries that are
// not messages: it leaves them in place, for Purge.
var ErrUndecodable = errors.New("poisoned entry is not a message of the broker's encoding")

// NewUndecodable describes an entry of a poison topic that could not be
// decoded: key is the broker's name for it (its ID too), raw its bytes,
// err why.
func NewUndecodable(key string, raw []byte, at time.Time, err error) Poisoned {
	return Poisoned{Key: key, ID: key, Payload: raw, Metadata: message.Metadata{}, PoisonedAt: at, Undecodable: err.Error()}
}

// LeftUndecodable is Replay's error for the undecodable entries it
// selected and left in place; nil when there are none.
func LeftUndecodable(ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	return fmt.Errorf("%w: left in place, purge them: %s", ErrUndecodable, strings.Join(ids, ", "))
}

// NewPoisoned describes msg as it was read from a poison topic, where the
// broker names it key.
func NewPoisoned(key string, msg *message.Message, at time.Time) Poisoned {
	p := Poisoned{Key: key, ID: msg.Metadata.Get(MetaMessageID), UUID: msg.UUID, Metadata: msg.Metadata, Payload: msg.Payload, PoisonedAt: at}
	if p.ID == "" {
		p.ID = msg.UUID
	}
	return p
}

// Reason is why the message was poisoned.
func (p Poisoned) Reason() string { return p.Metadata.Get(middleware.ReasonForPoisonedKey) }

// Handler is the handler that gave up on the message.
func (p Poisoned) Handler() string { return p.Metadata.Get(middleware.PoisonedHandlerKey) }

// Replayable is the message to publish again: p without the metadata
// the poison middleware added, so a replayed message that fails again is
// poisoned afresh, with its new reason.
func (p Poisoned) Replayable(ctx context.Context) *message.Message {
	msg := message.NewMessage(p.UUID, p.Payload)
	msg.Metadata = maps.Clone(p.Metadata)
	for _, k := range []string{middleware.ReasonForPoisonedKey, middleware.PoisonedTopicKey, middleware.PoisonedHandlerKey, middleware.PoisonedSubscriberKey} {
		delete(msg.Metadata, k)
	}
	msg.SetContext(ctx)
	return msg
}

// ReplayTargets are the topics a replay may publish to, in order: the
// push shards (config.Topics.PushTopics), the queues job consumes. An
// admin declares, creates or bounds each of them before it publishes, and
// publishes nowhere else.
type ReplayTargets []string

// Check refuses targets a replay cannot choose from: none, or a name that
// is empty or given twice.
func (t ReplayTargets) Check() error {
	if len(t) == 0 {
		return errors.New("replay targets: none given; want the push shards")
	}
	for i, topic := range t {
		if topic == "" {
			return fmt.Errorf("replay targets: target %d has no name", i)
		}
		if slices.Index(t, topic) != i {
			return fmt.Errorf("replay targets: %q given twice", topic)
		}
	}
	return nil
}

// For is the topic p is replayed to: the push shard it was poisoned from,
// as the poison middleware recorded it (middleware.PoisonedTopicKey), when
// that is one of t; else t[0], the first shard. t must pass Check, as
// every adapter's constructor makes sure.
//
// The recorded topic is metadata any publisher to the poison topic
// writes, so it is only ever compared with t, never published to as it
// stands: a forged one cannot send a replay to the upstream or poison
// topic, or to a queue nobody consumes. A recorded topic outside t is
// absent (not written by the middleware), forged, or a shard of an
// earlier topics.push_shards. Such a message goes to the first shard
// rather than to the shard its room or user hashes to now: finding that
// means decoding a body anyone may have written, and it buys nothing,
// because the order promise is per stream, enforced by positions at the
// cloud node, so any shard job consumes delivers the message rightly.
// One fixed shard makes where it went predictable (and the CLI says so);
// its cost is that, after a resharding, a large replay loads shard 0 alone
// and may stop at its length limit (ErrQueueFull), to be replayed again
// once job has drained it.
func (t ReplayTargets) For(p Poisoned) string {
	if topic := p.Metadata.Get(middleware.PoisonedTopicKey); topic != "" && slices.Contains(t, topic) {
		return topic
	}
	return t[0]
}

// Replayed counts the messages a replay re-published, by the topic each
// went to.
type Replayed map[string]int

// Total is how many messages the replay re-published, to any topic.
func (r Replayed) Total() int {
	n := 0
	for _, c := range r {
		n += c
	}
	return n
}

// Selector picks the poisoned messages an operation applies to.
type Selector func(Poisoned) bool

// All selects every message.
func All(Poisoned) bool { return true }

// IDs selects the messages with the given ids. Ids are not unique and
// any publisher chooses them: an operator's selection goes through
// ResolveIDs, which refuses an id naming two entries.
func IDs(ids ...string) Selector {
	return func(p Poisoned) bool { return slices.Contains(ids, p.ID) }
}

// Keys selects the entries with the given broker keys (Poisoned.Key).
func Keys(keys ...string) Selector {
	return func(p Poisoned) bool { return slices.Contains(keys, p.Key) }
}

// ErrBadKey is List's error for an after that names no entry of the
// topic (not a key of the broker's form or, where the broker pages from the
// head, gone).
var ErrBadKey = errors.New("not a key of a poisoned entry")

// ErrAmbiguousID is ResolveIDs' error for an id that names more than one
// entry: a publisher may give any message any id, so acting on all of
// them could drop or replay a decoy. Select by key instead.
var ErrAmbiguousID = errors.New("message id names more than one poisoned entry")

// ResolvePage is how many entries ResolveIDs reads at a time.
const ResolvePage = 1000

// ResolveIDs reads the whole poison topic in pages and selects, by key,
// the entries whose ids are ids; it refuses (ErrAmbiguousID, naming the
// keys) when one id names more than one entry. An entry published after
// it read is not selected, whatever its id.
func ResolveIDs(ctx context.Context, a PoisonAdmin, ids ...string) (Selector, error) {
	found := map[string][]string{}
	err := EachPage(ctx, a, ResolvePage, func(ps []Poisoned) error {
		for _, p := range ps {
			if slices.Contains(ids, p.ID) {
				found[p.ID] = append(found[p.ID], p.Key)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var keys, conflicts []string
	for _, id := range slices.Sorted(maps.Keys(found)) {
		ks := found[id]
		if len(ks) > 1 {
			conflicts = append(conflicts, fmt.Sprintf("%q has keys %s", id, strings.Join(ks, ", ")))
		}
		keys = append(keys, ks...)
	}
	if len(conflicts) > 0 {
		return nil, fmt.Errorf("%w: %s; select by key", ErrAmbiguousID, strings.Join(conflicts, "; "))
	}
	return Keys(keys...), nil
}

// EachPage lists the whole poison topic, limit entries at a time, oldest
// first, calling fn with each page.
func EachPage(ctx context.Context, a PoisonAdmin, limit int, fn func([]Poisoned) error) error {
	after := ""
	for {
		ps, more, err := a.List(ctx, after, limit)
		if err != nil {
			return err
		}
		if err := fn(ps); err != nil {
			return err
		}
		if !more || len(ps) == 0 {
			return nil
		}
		after = ps[len(ps)-1].Key
	}
}

// PoisonAdmin lets an operator list, replay and purge the messages of a
// broker's poison topic. Every broker adapter implements it and passes
// adapters/poisontest.
//
// Watermill's components/requeuer (v1.5) re-publishes every message of a
// poison topic after a delay, as a router handler subscribed to it: it
// has no way to look without taking, or to pick messages by id, which is
// what an operator does after fixing the cause of one failure; and it
// keeps the poison metadata (adding its own retry count) rather than
// leaving a replayed message to be poisoned afresh. So each adapter reads
// its broker's own way (a queue get, a stream range, a get by sequence,
// the embedded broker's memory) and replay re-publishes in the adapter's
// own encoding.
type PoisonAdmin interface {
	// List returns at most limit (> 0) poisoned messages, oldest first,
	// starting after the entry whose Key is after ("" for the first),
	// leaving them in place; more says entries remain past the page. An
	// entry that is not a message of the broker's encoding is listed with
	// Undecodable set, never dropped and never a failure of the whole
	// list. Pages bound what is held in memory: a poison topic may hold a
	// million messages.
	List(ctx context.Context, after string, limit int) (page []Poisoned, more bool, err error)
	// Depth is how many messages the poison topic holds now (what
	// replays and purges have not taken): imcloud_poison_messages.
	Depth(ctx context.Context) (int64, error)
	// Replay re-publishes the selected messages (Replayable), each to
	// the topic ReplayTargets.For chooses among those the admin was opened
	// with, and removes each from the poison topic once the broker accepted
	// it; it returns how many it replayed to each topic. Selected
	// undecodable entries stay, and the error wraps ErrUndecodable.
	// Admins racing on one message (two replays, or a replay and a purge)
	// replay it at most once between them, and a message another admin
	// purged after this one listed it is not replayed. (Whether a purge
	// that loses a race to a replay counts the message is the adapter's;
	// each says.)
	Replay(ctx context.Context, sel Selector) (Replayed, error)
	// A replay refused for want of room in the target fails with
	// ErrQueueFull, counting what went before; a cancelled ctx never
	// leaves a message both published and still in the poison topic.
	// Replay and Purge cover the whole topic, reading it in pages.
	//
	// Purge drops the selected messages and returns how many it dropped.
	Purge(ctx context.Context, sel Selector) (int, error)
	Close() error
}
