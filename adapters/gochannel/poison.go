package gochannel

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline"
)

// kept is what was published to a kept topic, oldest first: a bounded
// ring. At max the oldest message goes to make room for the new one, so a
// publish to a kept topic is never refused. Refusing it failed the poison
// middleware's handler: the message was nacked and redelivered for ever,
// holding a broker.gochannel.max_pending slot each, until every push got
// 503. A poison topic is where messages end when nothing else will take
// them; losing its oldest entry is the lesser harm.
type kept struct {
	topic string
	max   int
	// onEvict is told of each add that evicted messages, with the count
	// evicted since Keep.
	onEvict func(topic string, evicted int, total int64)
	mu      sync.Mutex
	seq     uint64
	evicted int64
	msgs    []keptMsg
}

type keptMsg struct {
	seq uint64
	at  time.Time
	msg *message.Message
}

// add holds copies of msgs, evicting the oldest held messages (and, past
// max in one call, the first of msgs) to stay within max.
func (k *kept) add(msgs []*message.Message) {
	now := time.Now()
	k.mu.Lock()
	for _, m := range msgs {
		k.seq++
		k.msgs = append(k.msgs, keptMsg{seq: k.seq, at: now, msg: m.Copy()})
	}
	n, total := k.trim()
	k.mu.Unlock()
	k.reportEvicted(n, total)
}

// trim evicts the oldest messages past max; k.mu is held. It returns how
// many it evicted and how many were since Keep.
func (k *kept) trim() (int, int64) {
	n := len(k.msgs) - k.max
	if n <= 0 {
		return 0, k.evicted
	}
	// Cleared, so the backing array does not keep them alive: append
	// moves the live tail to a new array when it runs out, and the
	// evicted prefix is left behind then.
	clear(k.msgs[:n])
	k.msgs = k.msgs[n:]
	k.evicted += int64(n)
	return n, k.evicted
}

func (k *kept) reportEvicted(n int, total int64) {
	if n > 0 && k.onEvict != nil {
		k.onEvict(k.topic, n, total)
	}
}

// Evicted is how many messages were evicted from the topic since Keep.
func (k *kept) Evicted() int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.evicted
}

// take removes and returns the selected messages.
func (k *kept) take(sel func(keptMsg) bool) []keptMsg {
	k.mu.Lock()
	defer k.mu.Unlock()
	var taken []keptMsg
	k.msgs = slices.DeleteFunc(k.msgs, func(m keptMsg) bool {
		if sel(m) {
			taken = append(taken, m)
			return true
		}
		return false
	})
	return taken
}

// putBack returns messages take removed, in their places. Newer messages
// may have filled the ring meanwhile: the oldest then go, as in add.
func (k *kept) putBack(msgs []keptMsg) {
	k.mu.Lock()
	k.msgs = append(k.msgs, msgs...)
	slices.SortFunc(k.msgs, func(a, b keptMsg) int { return cmp.Compare(a.seq, b.seq) })
	n, total := k.trim()
	k.mu.Unlock()
	k.reportEvicted(n, total)
}

// Keep makes p hold what is published to topic, until a PoisonAdmin
// replays or purges it, instead of dropping what no subscriber takes. It
// holds at most limit messages (at least 1): at limit the oldest is evicted
// for the new one, and onEvict (if not nil) is called with how many were
// evicted and how many since Keep; a publish to topic is never refused
// for want of room. Kept messages hold no max_pending slot: each is a
// copy held here, 0.9 KB with a 100-byte body and a push's metadata
// (899 bytes measured by TestKeptMemory, go1.26 amd64).
// Subscribers to topic still receive each message too. Call it before
// publishing to topic; a second Keep of a topic changes nothing.
func (p *PubSub) Keep(topic string, limit int, onEvict func(topic string, evicted int, total int64)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.kept[topic] == nil {
		p.kept[topic] = &kept{topic: topic, max: max(limit, 1), onEvict: onEvict}
	}
}

// Evicted is how many messages were evicted from the kept topic to make
// room for newer ones since Keep; 0 for a topic not kept.
func (p *PubSub) Evicted(topic string) int64 {
	p.mu.Lock()
	k := p.kept[topic]
	p.mu.Unlock()
	if k == nil {
		return 0
	}
	return k.Evicted()
}

// PoisonAdmin lists, replays to targets (pipeline.ReplayTargets.For picks
// one per message) and purges the messages of a topic Keep names. It
// lives in this process, as the messages do.
func (p *PubSub) PoisonAdmin(topic string, targets pipeline.ReplayTargets) (pipeline.PoisonAdmin, error) {
	if err := targets.Check(); err != nil {
		return nil, fmt.Errorf("poison admin of %s: %w", topic, err)
	}
	p.mu.Lock()
	k := p.kept[topic]
	p.mu.Unlock()
	if k == nil {
		return nil, fmt.Errorf("embedded broker keeps no messages of %s: Keep it first", topic)
	}
	return &poisonAdmin{ps: p, k: k, targets: slices.Clone(targets)}, nil
}

// poisonAdmin is the embedded broker's pipeline.PoisonAdmin. Replay and
// Purge take the selected messages out under one lock, so admins racing
// on a message act on it once between them, and the count of each says
// what it did.
type poisonAdmin struct {
	ps      *PubSub
	k       *kept
	targets pipeline.ReplayTargets
}

// poisonedOf describes m, keyed by its sequence in the ring: the
// publisher cannot choose it and it is never reused.
func poisonedOf(m keptMsg) pipeline.Poisoned {
	return pipeline.NewPoisoned(strconv.FormatUint(m.seq, 10), m.msg.Copy(), m.at)
}

// List returns up to limit kept messages after the one keyed after,
// oldest first.
func (a *poisonAdmin) List(_ context.Context, after string, limit int) ([]pipeline.Poisoned, bool, error) {
	var from uint64
	if after != "" {
		n, err := strconv.ParseUint(after, 10, 64)
		if err != nil {
			return nil, false, fmt.Errorf("list after %q: %w (the embedded broker's are sequence numbers)", after, pipeline.ErrBadKey)
		}
		from = n
	}
	limit = max(limit, 1)
	a.k.mu.Lock()
	defer a.k.mu.Unlock()
	i, _ := slices.BinarySearchFunc(a.k.msgs, from+1, func(m keptMsg, seq uint64) int { return cmp.Compare(m.seq, seq) })
	rest := a.k.msgs[i:]
	page := rest[:min(limit, len(rest))]
	out := make([]pipeline.Poisoned, 0, len(page))
	for _, m := range page {
		out = append(out, poisonedOf(m))
	}
	return out, len(rest) > len(page), nil
}

// Purge drops the selected messages.
func (a *poisonAdmin) Purge(_ context.Context, sel pipeline.Selector) (int, error) {
	return len(a.k.take(func(m keptMsg) bool { return sel(poisonedOf(m)) })), nil
}

// Replay publishes the selected messages, each to its target. The
// embedded broker drops what is published to a topic nobody in the
// process subscribes to, so when any of the targets chosen has no
// subscriber it replays nothing and says so. A message whose publish
// fails goes back in its place, with the ones after it.
func (a *poisonAdmin) Replay(ctx context.Context, sel pipeline.Selector) (pipeline.Replayed, error) {
	taken := a.k.take(func(m keptMsg) bool { return sel(poisonedOf(m)) })
	done := pipeline.Replayed{}
	if len(taken) == 0 {
		return done, nil
	}
	to := make([]string, len(taken))
	var unheard []string
	a.ps.mu.Lock()
	for i, m := range taken {
		to[i] = a.targets.For(poisonedOf(m))
		if !a.ps.heardLocked(to[i]) && !slices.Contains(unheard, to[i]) {
			unheard = append(unheard, to[i])
		}
	}
	a.ps.mu.Unlock()
	if len(unheard) > 0 {
		a.k.putBack(taken)
		return done, fmt.Errorf("replay to %s: nothing in this process subscribes to it, and the embedded broker would drop what is replayed", strings.Join(unheard, ", "))
	}
	for i, m := range taken {
		p := poisonedOf(m)
		if err := a.ps.Publish(to[i], p.Replayable(ctx)); err != nil {
			a.k.putBack(taken[i:])
			return done, fmt.Errorf("replay %s to %s: %w", p.Key, to[i], err)
		}
		done[to[i]]++
	}
	return done, nil
}

// Close releases nothing: the messages stay with the broker.
func (a *poisonAdmin) Close() error { return nil }

// Depth is how many poisoned messages the process keeps.
func (a *poisonAdmin) Depth(context.Context) (int64, error) {
	a.k.mu.Lock()
	defer a.k.mu.Unlock()
	return int64(len(a.k.msgs)), nil
}
