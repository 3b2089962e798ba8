// Package poisontest is the contract every broker adapter's
// pipeline.PoisonAdmin passes: list, replay and purge on a poison topic
// that the broker's own publisher wrote, as Watermill's poison middleware
// does.
package poisontest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"imcloud/pipeline"
)

// Broker is one broker under test.
type Broker struct {
	// Publisher publishes to the broker's topics, as the poison middleware
	// and the stages do.
	Publisher message.Publisher
	// Subscriber reads the replay targets.
	Subscriber message.Subscriber
	// Admin opens an admin over poison whose Replay publishes to targets.
	// The suite opens it before publishing to poison (the embedded broker
	// keeps only a topic it was told to), and opens two on one topic to
	// race them; it closes them.
	Admin func(t *testing.T, poison string, targets pipeline.ReplayTargets) pipeline.PoisonAdmin
	// Garbage writes to poison an entry that is not a message of the
	// adapter's encoding. Nil only where the broker holds decoded
	// messages, with no encoding to break (the embedded broker).
	Garbage func(t *testing.T, poison string)
	// RecordsTime says the broker records when each message was written,
	// to the second at least.
	RecordsTime bool
	// BoundedAdmin opens an admin as Admin does, each target named in
	// limits bounded to that many messages as the broker's bounded
	// publisher bounds it (the others unbounded). Nil only where topics
	// have no length limit (the embedded broker).
	BoundedAdmin func(t *testing.T, poison string, targets pipeline.ReplayTargets, limits map[string]int64) pipeline.PoisonAdmin
}

// Run runs the contract. Topics are prefix followed by something unique;
// clean them up after by prefix.
func Run(t *testing.T, prefix string, newBroker func(t *testing.T) Broker) {
	tests := []struct {
		name string
		run  func(t *testing.T, e *env)
	}{
		{"EmptyList", testEmpty},
		{"ListOldestFirstLeavesInPlace", testList},
		{"PurgeIDs", testPurgeIDs},
		{"ReplayIDs", testReplayIDs},
		{"ReplayAndPurgeAll", testAll},
		{"UnknownIDSelectsNothing", testUnknown},
		{"PurgedByAnotherIsNotReplayed", testPurgedByAnother},
		{"ConcurrentReplaysReplayOnce", testConcurrentReplays},
		{"Undecodable", testUndecodable},
		{"ListPages", testListPages},
		{"KeysAreTheBrokers", testKeys},
		{"ReplayStopsAtTargetLimit", testReplayLimit},
		{"ReplayToTheShardPoisonedFrom", testReplayShards},
		{"ReplayLimitIsTheChosenShards", testReplayShardLimit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBroker(t)
			unique := fmt.Sprintf("%s%d", prefix, time.Now().UnixNano())
			// Two push shards, named as config.Topics.PushTopics names
			// them; the first is where most cases replay to.
			targets := pipeline.ReplayTargets{unique + ".push.0", unique + ".push.1"}
			e := &env{b: b, poison: unique + ".poison", target: targets[0], targets: targets, outside: unique + ".push.2"}
			e.admin = e.open(t)
			tt.run(t, e)
		})
	}
}

type env struct {
	b      Broker
	poison string
	// targets are the push shards the admins replay to; target is the
	// first, where a message poisoned from it (or from outside them) goes.
	targets pipeline.ReplayTargets
	target  string
	// outside is a topic no admin is given: a shard of a larger
	// push_shards, which a replay must never publish to.
	outside string
	admin   pipeline.PoisonAdmin
}

func (e *env) open(t *testing.T) pipeline.PoisonAdmin {
	t.Helper()
	a := e.b.Admin(t, e.poison, e.targets)
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("close admin: %v", err)
		}
	})
	return a
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// poisoned is message i as the poison middleware writes it on giving up
// on it in the first shard.
func (e *env) poisoned(i int) *message.Message {
	msg := message.NewMessage(fmt.Sprintf("uuid-%d-%d", i, time.Now().UnixNano()), fmt.Appendf(nil, "payload %d", i))
	msg.Metadata = message.Metadata{
		pipeline.MetaMessageID:           fmt.Sprintf("id-%d", i),
		"kept":                           fmt.Sprintf("kept %d", i),
		middleware.ReasonForPoisonedKey:  fmt.Sprintf("reason %d", i),
		middleware.PoisonedTopicKey:      e.target,
		middleware.PoisonedHandlerKey:    "job",
		middleware.PoisonedSubscriberKey: "sub",
	}
	return msg
}

// publish writes messages 1..n to the poison topic, one at a time so that
// their order is the broker's order.
func (e *env) publish(t *testing.T, n int) []*message.Message {
	t.Helper()
	var out []*message.Message
	for i := 1; i <= n; i++ {
		msg := e.poisoned(i)
		if err := e.b.Publisher.Publish(e.poison, msg); err != nil {
			t.Fatalf("publish %d to %s: %v", i, e.poison, err)
		}
		out = append(out, msg)
	}
	return out
}

func ids(ps []pipeline.Poisoned) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.ID)
	}
	return out
}

// list lists everything, in pages of two so that paging is exercised.
func (e *env) list(t *testing.T, a pipeline.PoisonAdmin) []pipeline.Poisoned {
	t.Helper()
	var ps []pipeline.Poisoned
	err := pipeline.EachPage(ctxFor(t), a, 2, func(page []pipeline.Poisoned) error {
		if len(page) > 2 {
			return fmt.Errorf("page of %d entries, asked for 2", len(page))
		}
		ps = append(ps, page...)
		return nil
	})
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	return ps
}

func keys(ps []pipeline.Poisoned) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.Key)
	}
	return out
}

func (e *env) wantIDs(t *testing.T, want ...string) {
	t.Helper()
	if got := ids(e.list(t, e.admin)); !slices.Equal(got, want) {
		t.Fatalf("listed %v, want %v", got, want)
	}
}

// receiver collects what arrives on the replay target.
type receiver struct {
	mu  sync.Mutex
	got []*message.Message
	ch  chan struct{}
}

// receive subscribes to the first target before anything is replayed to
// it.
func (e *env) receive(t *testing.T) *receiver { return e.receiveFrom(t, e.target) }

// receiveFrom subscribes to topic before anything is replayed to it.
func (e *env) receiveFrom(t *testing.T, topic string) *receiver {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	msgs, err := e.b.Subscriber.Subscribe(ctx, topic)
	if err != nil {
		t.Fatalf("subscribe %s: %v", topic, err)
	}
	r := &receiver{ch: make(chan struct{}, 1)}
	go func() {
		for m := range msgs {
			m.Ack()
			r.mu.Lock()
			r.got = append(r.got, m)
			r.mu.Unlock()
			select {
			case r.ch <- struct{}{}:
			default:
			}
		}
	}()
	return r
}

// waitFor waits until the messages with the given MetaMessageIDs have all
// arrived, and returns every message received so far.
func (r *receiver) waitFor(t *testing.T, want ...string) []*message.Message {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		r.mu.Lock()
		got := slices.Clone(r.got)
		r.mu.Unlock()
		have := map[string]bool{}
		for _, m := range got {
			have[m.Metadata.Get(pipeline.MetaMessageID)] = true
		}
		if !slices.ContainsFunc(want, func(id string) bool { return !have[id] }) {
			return got
		}
		select {
		case <-r.ch:
		case <-deadline:
			t.Fatalf("replay target received %v, want %v among them", receivedIDs(got), want)
		}
	}
}

func receivedIDs(msgs []*message.Message) []string {
	out := make([]string, 0, len(msgs))
	for _, m := range msgs {
		out = append(out, m.Metadata.Get(pipeline.MetaMessageID))
	}
	return out
}

// sentinel replays one more message to the first target after the ones
// under test and waits for it and want, then returns what arrived (r's).
// The target is read in order by one subscriber, so a duplicate replayed
// before the sentinel arrives before it, or in the same burst.
func (e *env) sentinel(t *testing.T, r *receiver, want ...string) []*message.Message {
	t.Helper()
	return e.sentinelTo(t, r, e.target, want...)
}

// sentinelTo is sentinel through target, one of e.targets: the sentinel
// is poisoned from it, so replay sends it back there.
func (e *env) sentinelTo(t *testing.T, r *receiver, target string, want ...string) []*message.Message {
	t.Helper()
	s := e.poisoned(999)
	s.Metadata.Set(pipeline.MetaMessageID, "sentinel")
	s.Metadata.Set(middleware.PoisonedTopicKey, target)
	if err := e.b.Publisher.Publish(e.poison, s); err != nil {
		t.Fatalf("publish sentinel: %v", err)
	}
	if got, err := e.admin.Replay(ctxFor(t), pipeline.IDs("sentinel")); err != nil || !only(got, target, 1) {
		t.Fatalf("replay sentinel: %v, %v; want 1 to %s", got, err, target)
	}
	got := r.waitFor(t, append(want, "sentinel")...)
	var out []*message.Message
	for _, m := range got {
		if m.Metadata.Get(pipeline.MetaMessageID) != "sentinel" {
			out = append(out, m)
		}
	}
	return out
}

// only says got counts n messages, all replayed to target.
func only(got pipeline.Replayed, target string, n int) bool {
	return got.Total() == n && got[target] == n
}

func testEmpty(t *testing.T, e *env) {
	if ps := e.list(t, e.admin); len(ps) != 0 {
		t.Fatalf("fresh poison topic lists %v", ids(ps))
	}
	e.wantDepth(t, 0)
}

// wantDepth checks the admin's Depth.
func (e *env) wantDepth(t *testing.T, want int64) {
	t.Helper()
	if got, err := e.admin.Depth(ctxFor(t)); err != nil || got != want {
		t.Fatalf("depth %d, %v; want %d", got, err, want)
	}
}

func testList(t *testing.T, e *env) {
	before := time.Now().Truncate(time.Second)
	sent := e.publish(t, 3)
	after := time.Now().Add(time.Second)
	first := e.list(t, e.admin)
	if len(first) != len(sent) {
		t.Fatalf("listed %v, want 3", ids(first))
	}
	for i, p := range first {
		want := sent[i]
		if p.ID != want.Metadata.Get(pipeline.MetaMessageID) || p.UUID != want.UUID || string(p.Payload) != string(want.Payload) {
			t.Errorf("entry %d: id %q uuid %q payload %q, want %q %q %q", i, p.ID, p.UUID, p.Payload, want.Metadata.Get(pipeline.MetaMessageID), want.UUID, want.Payload)
		}
		for k, v := range want.Metadata {
			if p.Metadata.Get(k) != v {
				t.Errorf("entry %d: metadata %s = %q, want %q", i, k, p.Metadata.Get(k), v)
			}
		}
		if p.Reason() != fmt.Sprintf("reason %d", i+1) || p.Handler() != "job" || p.Undecodable != "" {
			t.Errorf("entry %d: reason %q handler %q undecodable %q", i, p.Reason(), p.Handler(), p.Undecodable)
		}
		if e.b.RecordsTime && (p.PoisonedAt.Before(before) || p.PoisonedAt.After(after)) {
			t.Errorf("entry %d: poisoned at %v, want within [%v, %v]", i, p.PoisonedAt, before, after)
		}
	}
	second := e.list(t, e.admin)
	if !slices.Equal(ids(first), ids(second)) {
		t.Fatalf("second list %v differs from first %v", ids(second), ids(first))
	}
	for i := range first {
		if !maps.Equal(first[i].Metadata, second[i].Metadata) || string(first[i].Payload) != string(second[i].Payload) || !first[i].PoisonedAt.Equal(second[i].PoisonedAt) {
			t.Errorf("entry %d changed between lists: %+v then %+v", i, first[i], second[i])
		}
	}
}

func testPurgeIDs(t *testing.T, e *env) {
	e.publish(t, 3)
	e.wantDepth(t, 3)
	n, err := e.admin.Purge(ctxFor(t), pipeline.IDs("id-1", "id-3"))
	if err != nil || n != 2 {
		t.Fatalf("purge id-1, id-3: %d, %v; want 2", n, err)
	}
	e.wantIDs(t, "id-2")
	e.wantDepth(t, 1)
}

func testReplayIDs(t *testing.T, e *env) {
	r := e.receive(t)
	sent := e.publish(t, 3)
	n, err := e.admin.Replay(ctxFor(t), pipeline.IDs("id-2"))
	if err != nil || !only(n, e.target, 1) {
		t.Fatalf("replay id-2: %v, %v; want 1 to %s", n, err, e.target)
	}
	e.wantIDs(t, "id-1", "id-3")
	got := e.sentinel(t, r, "id-2")
	if len(got) != 1 {
		t.Fatalf("target received %v, want id-2 once", receivedIDs(got))
	}
	m, want := got[0], sent[1]
	if string(m.Payload) != string(want.Payload) || m.UUID != want.UUID {
		t.Errorf("replayed uuid %q payload %q, want %q %q", m.UUID, m.Payload, want.UUID, want.Payload)
	}
	if m.Metadata.Get("kept") != "kept 2" || m.Metadata.Get(pipeline.MetaMessageID) != "id-2" {
		t.Errorf("replayed metadata %v lost what it carried", m.Metadata)
	}
	for _, k := range []string{middleware.ReasonForPoisonedKey, middleware.PoisonedTopicKey, middleware.PoisonedHandlerKey, middleware.PoisonedSubscriberKey} {
		if _, ok := m.Metadata[k]; ok {
			t.Errorf("replayed message still carries poison metadata %s: %v", k, m.Metadata)
		}
	}
}

func testAll(t *testing.T, e *env) {
	r := e.receive(t)
	e.publish(t, 3)
	replayed, err := e.admin.Replay(ctxFor(t), pipeline.All)
	if err != nil || !only(replayed, e.target, 3) {
		t.Fatalf("replay all: %v, %v; want 3 to %s", replayed, err, e.target)
	}
	e.wantIDs(t)
	got := e.sentinel(t, r, "id-1", "id-2", "id-3")
	if ids := receivedIDs(got); len(ids) != 3 {
		t.Fatalf("target received %v, want id-1..3 once each", ids)
	}
	e.publish(t, 2)
	n, err := e.admin.Purge(ctxFor(t), pipeline.All)
	if err != nil || n != 2 {
		t.Fatalf("purge all: %d, %v; want 2", n, err)
	}
	e.wantIDs(t)
}

func testUnknown(t *testing.T, e *env) {
	e.publish(t, 2)
	if n, err := e.admin.Replay(ctxFor(t), pipeline.IDs("no-such-id")); err != nil || n.Total() != 0 {
		t.Fatalf("replay unknown id: %v, %v; want 0", n, err)
	}
	if n, err := e.admin.Purge(ctxFor(t), pipeline.IDs("no-such-id")); err != nil || n != 0 {
		t.Fatalf("purge unknown id: %d, %v; want 0", n, err)
	}
	e.wantIDs(t, "id-1", "id-2")
}

// testPurgedByAnother: an operator lists, another purges what was listed,
// then the first replays it by id: nothing is replayed.
func testPurgedByAnother(t *testing.T, e *env) {
	r := e.receive(t)
	e.publish(t, 2)
	other := e.open(t)
	if got := ids(e.list(t, e.admin)); !slices.Equal(got, []string{"id-1", "id-2"}) {
		t.Fatalf("listed %v", got)
	}
	if n, err := other.Purge(ctxFor(t), pipeline.IDs("id-1")); err != nil || n != 1 {
		t.Fatalf("other admin purge id-1: %d, %v; want 1", n, err)
	}
	if n, err := e.admin.Replay(ctxFor(t), pipeline.IDs("id-1")); err != nil || n.Total() != 0 {
		t.Fatalf("replay of a purged id: %v, %v; want 0", n, err)
	}
	if got := receivedIDs(e.sentinel(t, r)); len(got) != 0 {
		t.Fatalf("target received %v, want nothing", got)
	}
	e.wantIDs(t, "id-2")
}

// testConcurrentReplays races two admins replaying everything: each
// message is replayed once between them.
func testConcurrentReplays(t *testing.T, e *env) {
	const n = 20
	r := e.receive(t)
	e.publish(t, n)
	admins := []pipeline.PoisonAdmin{e.admin, e.open(t)}
	counts := make([]pipeline.Replayed, len(admins))
	errs := make([]error, len(admins))
	var wg sync.WaitGroup
	for i, a := range admins {
		wg.Go(func() { counts[i], errs[i] = a.Replay(ctxFor(t), pipeline.All) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent replays: %v", err)
	}
	if counts[0][e.target]+counts[1][e.target] != n || counts[0].Total()+counts[1].Total() != n {
		t.Errorf("concurrent replays counted %v, want %d between them", counts, n)
	}
	e.wantIDs(t)
	var want []string
	for i := 1; i <= n; i++ {
		want = append(want, fmt.Sprintf("id-%d", i))
	}
	got := receivedIDs(e.sentinel(t, r, want...))
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("target received %v, want each of %v once", got, want)
	}
}

// testUndecodable: an entry that is not a message of the adapter's
// encoding is listed, marked, beside the good ones; replay leaves it with
// an error saying so; purge by its id drops it.
func testUndecodable(t *testing.T, e *env) {
	if e.b.Garbage == nil {
		// The embedded broker holds decoded messages: nothing can be
		// undecodable, which this asserts by listing a good message.
		e.publish(t, 1)
		e.wantIDs(t, "id-1")
		return
	}
	r := e.receive(t)
	e.b.Garbage(t, e.poison)
	e.publish(t, 1)
	ps := e.list(t, e.admin)
	if len(ps) != 2 {
		t.Fatalf("listed %v, want the undecodable entry and id-1", ids(ps))
	}
	bad := ps[0]
	if bad.Undecodable == "" || bad.ID == "" {
		t.Fatalf("garbage listed as %+v, want an id and why it is undecodable", bad)
	}
	if ps[1].ID != "id-1" || ps[1].Undecodable != "" {
		t.Fatalf("good message listed as %+v", ps[1])
	}
	replayed, err := e.admin.Replay(ctxFor(t), pipeline.All)
	if !errors.Is(err, pipeline.ErrUndecodable) || !only(replayed, e.target, 1) {
		t.Fatalf("replay all beside garbage: %v, %v; want 1 and ErrUndecodable", replayed, err)
	}
	if got := receivedIDs(e.sentinel(t, r, "id-1")); !slices.Equal(got, []string{"id-1"}) {
		t.Fatalf("target received %v, want id-1", got)
	}
	e.wantIDs(t, bad.ID)
	if bad.Key == "" || bad.Key == ps[1].Key {
		t.Fatalf("undecodable entry keyed %q beside %q, want a key of its own", bad.Key, ps[1].Key)
	}
	if n, err := e.admin.Purge(ctxFor(t), pipeline.Keys(bad.Key)); err != nil || n != 1 {
		t.Fatalf("purge undecodable %s: %d, %v; want 1", bad.Key, n, err)
	}
	e.wantIDs(t)
}

// testListPages: List returns at most limit entries after the one keyed
// after, and says whether more remain.
func testListPages(t *testing.T, e *env) {
	e.publish(t, 5)
	var got [][]string
	after := ""
	for range 4 {
		page, more, err := e.admin.List(ctxFor(t), after, 2)
		if err != nil {
			t.Fatalf("list after %q: %v", after, err)
		}
		got = append(got, ids(page))
		if !more {
			break
		}
		after = page[len(page)-1].Key
	}
	want := [][]string{{"id-1", "id-2"}, {"id-3", "id-4"}, {"id-5"}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("pages %v, want %v", got, want)
	}
	one, more, err := e.admin.List(ctxFor(t), "", 1)
	if err != nil || len(one) != 1 || !more {
		t.Fatalf("list of 1: %v, more %v, %v; want id-1 and more", ids(one), more, err)
	}
	if _, _, err := e.admin.List(ctxFor(t), "no such key", 2); !errors.Is(err, pipeline.ErrBadKey) {
		t.Fatalf("list after a key of no entry: %v; want ErrBadKey", err)
	}
}

// testKeys: a publisher chooses message ids, not keys. Two entries with
// one id have distinct keys and an id-based selection of them is refused;
// an id equal to another entry's key selects only its own entry, and the
// key only the keyed one.
func testKeys(t *testing.T, e *env) {
	e.publish(t, 2)
	decoy := e.poisoned(2)
	if err := e.b.Publisher.Publish(e.poison, decoy); err != nil {
		t.Fatalf("publish decoy: %v", err)
	}
	ps := e.list(t, e.admin)
	if got := ids(ps); !slices.Equal(got, []string{"id-1", "id-2", "id-2"}) {
		t.Fatalf("listed %v", got)
	}
	ks := keys(ps)
	if slices.Contains(ks, "") || len(slices.Compact(slices.Sorted(slices.Values(ks)))) != 3 {
		t.Fatalf("keys %v, want three distinct", ks)
	}
	_, err := pipeline.ResolveIDs(ctxFor(t), e.admin, "id-2")
	if !errors.Is(err, pipeline.ErrAmbiguousID) || !strings.Contains(err.Error(), ks[1]) || !strings.Contains(err.Error(), ks[2]) {
		t.Fatalf("resolve id-2 named twice: %v; want ErrAmbiguousID naming %s and %s", err, ks[1], ks[2])
	}
	// An attacker's message whose id is id-1's key.
	forged := e.poisoned(3)
	forged.Metadata.Set(pipeline.MetaMessageID, ks[0])
	if err := e.b.Publisher.Publish(e.poison, forged); err != nil {
		t.Fatalf("publish forged: %v", err)
	}
	sel, err := pipeline.ResolveIDs(ctxFor(t), e.admin, ks[0])
	if err != nil {
		t.Fatalf("resolve id %s: %v", ks[0], err)
	}
	if n, err := e.admin.Purge(ctxFor(t), sel); err != nil || n != 1 {
		t.Fatalf("purge by id %s: %d, %v; want 1", ks[0], n, err)
	}
	e.wantIDs(t, "id-1", "id-2", "id-2")
	if n, err := e.admin.Purge(ctxFor(t), pipeline.Keys(ks[2])); err != nil || n != 1 {
		t.Fatalf("purge key %s: %d, %v; want 1", ks[2], n, err)
	}
	if got := keys(e.list(t, e.admin)); !slices.Equal(got, ks[:2]) {
		t.Fatalf("after purging the decoy's key, keys %v, want %v", got, ks[:2])
	}
}

// testReplayLimit: replay to a target bounded to 3 messages replays 3 of
// 10, refuses the fourth with ErrQueueFull, and leaves the rest poisoned.
func testReplayLimit(t *testing.T, e *env) {
	const limit, n = 3, 10
	if e.b.BoundedAdmin == nil {
		// Topics of the embedded broker have no length limit: all go.
		r := e.receive(t)
		e.publish(t, n)
		if got, err := e.admin.Replay(ctxFor(t), pipeline.All); err != nil || !only(got, e.target, n) {
			t.Fatalf("replay all: %v, %v; want %d", got, err, n)
		}
		r.waitFor(t, "id-1", fmt.Sprintf("id-%d", n))
		return
	}
	a := e.b.BoundedAdmin(t, e.poison, e.targets, map[string]int64{e.target: limit})
	t.Cleanup(func() { _ = a.Close() })
	e.publish(t, n)
	got, err := a.Replay(ctxFor(t), pipeline.All)
	if !errors.Is(err, pipeline.ErrQueueFull) || !only(got, e.target, limit) {
		t.Fatalf("replay all to a target of %d: %v, %v; want %d and ErrQueueFull", limit, got, err, limit)
	}
	var want []string
	for i := limit + 1; i <= n; i++ {
		want = append(want, fmt.Sprintf("id-%d", i))
	}
	e.wantIDs(t, want...)
}

// publishFrom writes to the poison topic message i (as poisoned makes it)
// for each topic of from, in order, recording that it was poisoned from
// it: "" records nothing, as a message not written by the middleware.
func (e *env) publishFrom(t *testing.T, from ...string) {
	t.Helper()
	for i, topic := range from {
		msg := e.poisoned(i + 1)
		if topic == "" {
			delete(msg.Metadata, middleware.PoisonedTopicKey)
		} else {
			msg.Metadata.Set(middleware.PoisonedTopicKey, topic)
		}
		if err := e.b.Publisher.Publish(e.poison, msg); err != nil {
			t.Fatalf("publish %d to %s: %v", i+1, e.poison, err)
		}
	}
}

// testReplayShards: each message goes back to the push shard it was
// poisoned from; one whose recorded topic is none of the shards the admin
// was given (a shard of a larger push_shards, the poison topic itself,
// or none at all) goes to the first shard, and nothing goes anywhere
// else.
func testReplayShards(t *testing.T, e *env) {
	r0, r1, outside := e.receiveFrom(t, e.targets[0]), e.receiveFrom(t, e.targets[1]), e.receiveFrom(t, e.outside)
	e.publishFrom(t,
		e.targets[1], // id-1
		e.targets[0], // id-2
		e.outside,    // id-3: a shard of a larger push_shards
		"",           // id-4: no record
		e.targets[1], // id-5
		e.poison,     // id-6: forged, a loop were it followed
	)
	got, err := e.admin.Replay(ctxFor(t), pipeline.All)
	if want := (pipeline.Replayed{e.targets[0]: 4, e.targets[1]: 2}); err != nil || !maps.Equal(got, want) {
		t.Fatalf("replay all: %v, %v; want %v", got, err, want)
	}
	// Replayed to the poison topic, id-6 would be listed again.
	e.wantIDs(t)
	for _, c := range []struct {
		r      *receiver
		target string
		want   []string
	}{
		{r0, e.targets[0], []string{"id-2", "id-3", "id-4", "id-6"}},
		{r1, e.targets[1], []string{"id-1", "id-5"}},
	} {
		got := receivedIDs(e.sentinelTo(t, c.r, c.target, c.want...))
		slices.Sort(got)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s received %v, want %v once each", c.target, got, c.want)
		}
	}
	// The outside topic is read in order too: anything replayed to it
	// arrives before a marker published after the replay.
	marker := e.poisoned(998)
	marker.Metadata.Set(pipeline.MetaMessageID, "marker")
	if err := e.b.Publisher.Publish(e.outside, marker); err != nil {
		t.Fatalf("publish marker to %s: %v", e.outside, err)
	}
	if got := receivedIDs(outside.waitFor(t, "marker")); !slices.Equal(got, []string{"marker"}) {
		t.Errorf("%s, a topic outside the targets, received %v", e.outside, got)
	}
}

// testReplayShardLimit: each message is held to the length limit of the
// shard it goes to. The second shard, unbounded, takes its five; the
// first, bounded to 3, takes three of its five and refuses the fourth.
func testReplayShardLimit(t *testing.T, e *env) {
	if e.b.BoundedAdmin == nil {
		t.Skip("topics of the embedded broker have no length limit")
	}
	const limit = 3
	a := e.b.BoundedAdmin(t, e.poison, e.targets, map[string]int64{e.targets[0]: limit})
	t.Cleanup(func() { _ = a.Close() })
	var from []string
	for range 5 {
		from = append(from, e.targets[1])
	}
	for range 5 {
		from = append(from, e.targets[0])
	}
	e.publishFrom(t, from...)
	got, err := a.Replay(ctxFor(t), pipeline.All)
	if want := (pipeline.Replayed{e.targets[1]: 5, e.targets[0]: limit}); !errors.Is(err, pipeline.ErrQueueFull) || !maps.Equal(got, want) {
		t.Fatalf("replay all: %v, %v; want %v and ErrQueueFull", got, err, want)
	}
	e.wantIDs(t, "id-9", "id-10")
}
