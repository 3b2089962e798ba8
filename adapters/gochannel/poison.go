package gochannel

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline"
)

// kept is what was published to a kept topic, oldest first.
type kept struct {
	topic string
	max   int
	mu    sync.Mutex
	seq   uint64
	msgs  []keptMsg
}

type keptMsg struct {
	seq uint64
	at  time.Time
	msg *message.Message
}

// add holds copies of msgs, or none of them if that would pass max.
func (k *kept) add(msgs []*message.Message) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.msgs)+len(msgs) > k.max {
		return fmt.Errorf("%w: %s holds its limit of %d messages", ErrQueueFull, k.topic, k.max)
	}
	now := time.Now()
	for _, m := range msgs {
		k.seq++
		k.msgs = append(k.msgs, keptMsg{seq: k.seq, at: now, msg: m.Copy()})
	}
	return nil
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

// putBack returns messages take removed, in their places.
func (k *kept) putBack(msgs []keptMsg) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.msgs = append(k.msgs, msgs...)
	slices.SortFunc(k.msgs, func(a, b keptMsg) int { return cmp.Compare(a.seq, b.seq) })
}

// Keep makes p hold what is published to topic, at most max messages (at
// max, a publish to it fails with ErrQueueFull), until a PoisonAdmin
// replays or purges them, instead of dropping what no subscriber takes.
// Subscribers to topic still receive each message too. Call it before
// publishing to topic.
func (p *PubSub) Keep(topic string, max int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.kept[topic] == nil {
		p.kept[topic] = &kept{topic: topic, max: max}
	}
}

// PoisonAdmin lists, replays to target and purges the messages of a
// topic Keep names. It lives in this process, as the messages do.
func (p *PubSub) PoisonAdmin(topic, target string) (pipeline.PoisonAdmin, error) {
	p.mu.Lock()
	k := p.kept[topic]
	p.mu.Unlock()
	if k == nil {
		return nil, fmt.Errorf("embedded broker keeps no messages of %s: Keep it first", topic)
	}
	return &poisonAdmin{ps: p, k: k, target: target}, nil
}

// poisonAdmin is the embedded broker's pipeline.PoisonAdmin. Replay and
// Purge take the selected messages out under one lock, so admins racing
// on a message act on it once between them, and the count of each says
// what it did.
type poisonAdmin struct {
	ps     *PubSub
	k      *kept
	target string
}

func poisonedOf(m keptMsg) pipeline.Poisoned {
	return pipeline.NewPoisoned(m.msg.Copy(), m.at)
}

// List returns the kept messages, oldest first.
func (a *poisonAdmin) List(context.Context) ([]pipeline.Poisoned, error) {
	a.k.mu.Lock()
	defer a.k.mu.Unlock()
	out := make([]pipeline.Poisoned, 0, len(a.k.msgs))
	for _, m := range a.k.msgs {
		out = append(out, poisonedOf(m))
	}
	return out, nil
}

// Purge drops the selected messages.
func (a *poisonAdmin) Purge(_ context.Context, sel pipeline.Selector) (int, error) {
	return len(a.k.take(func(m keptMsg) bool { return sel(poisonedOf(m)) })), nil
}

// Replay publishes the selected messages to the target. The embedded
// broker drops what is published to a topic nobody in the process
// subscribes to, so with no subscriber to the target it replays nothing
// and says so. A message whose publish fails goes back in its place, with
// the ones after it.
func (a *poisonAdmin) Replay(ctx context.Context, sel pipeline.Selector) (int, error) {
	taken := a.k.take(func(m keptMsg) bool { return sel(poisonedOf(m)) })
	if len(taken) == 0 {
		return 0, nil
	}
	a.ps.mu.Lock()
	subs := a.ps.subs[a.target]
	a.ps.mu.Unlock()
	if subs == 0 {
		a.k.putBack(taken)
		return 0, fmt.Errorf("replay to %s: nothing in this process subscribes to it, and the embedded broker would drop what is replayed", a.target)
	}
	for i, m := range taken {
		if err := a.ps.Publish(a.target, poisonedOf(m).Replayable(ctx)); err != nil {
			a.k.putBack(taken[i:])
			return i, fmt.Errorf("replay %s to %s: %w", poisonedOf(m).ID, a.target, err)
		}
	}
	return len(taken), nil
}

// Close releases nothing: the messages stay with the broker.
func (a *poisonAdmin) Close() error { return nil }
