package job

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/protobuf/proto"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// pushKeys delivers a key push. Every key in it was online when logic
// accepted it (logic answers the offline ones itself and leaves them
// out), so a key its node does not have now is not delivered: typically
// the node restarted and the client has not reconnected yet. Such keys
// are retried, on whatever node they are connected to by then (or, for a
// mid push, through their user's new connections), until the grace
// period ends (pipeline.UndeliveredError); the message's payload keeps
// only the keys still undelivered, so that a retry, the poison queue and
// a replay carry no key twice.
func (s *Stage) pushKeys(ctx context.Context, msg *message.Message, pm *pb.PushMsg, p *pb.Proto, nodes map[string]string) error {
	round, _ := strconv.Atoi(msg.Metadata.Get(pipeline.MetaOfflineRound))
	plan, err := s.locate(ctx, msg, pm, round)
	if err != nil {
		return err
	}
	for server := range plan.targets {
		if _, ok := nodes[server]; !ok && s.cache != nil {
			// A kept node list may predate the node: look again once.
			if nodes, err = s.addrsWith(ctx, slices.Collect(maps.Keys(plan.targets))); err != nil {
				return err
			}
			break
		}
	}
	state := map[string]keyState{} // by target key
	var (
		errs  []error
		where []string
	)
	for _, server := range slices.Sorted(maps.Keys(plan.targets)) {
		keys := plan.targets[server]
		addr, ok := nodes[server]
		if !ok {
			// The node lapsed from the registry: it holds no connections.
			where = append(where, server+" (gone)")
			continue // offline: the zero state
		}
		c, err := s.clouds.Client(addr)
		if err != nil {
			setAll(state, keys, keyFailed)
			errs = append(errs, err)
			continue
		}
		reply, err := c.PushMsg(ctx, &pb.PushMsgReq{Keys: keys, Proto: plan.protoFor(p, keys)})
		if err != nil {
			setAll(state, keys, keyFailed)
			errs = append(errs, fmt.Errorf("push to %d keys on %s: %w", len(keys), server, err))
			continue
		}
		setAll(state, keys, keyDelivered)
		setAll(state, reply.Offline, keyOffline)
		if len(reply.Offline) > 0 {
			where = append(where, server)
		}
	}
	// A key of the message is delivered when any connection standing for
	// it took the push.
	var delivered, offline, failed []string
	for _, k := range pm.Keys {
		st := keyOffline
		for _, t := range plan.standIns(k) {
			st = max(st, state[t])
		}
		switch st {
		case keyDelivered:
			delivered = append(delivered, k)
		case keyFailed:
			failed = append(failed, k)
		default:
			offline = append(offline, k)
		}
	}
	s.offline.forget(delivered)
	// Rewritten only when some keys are still to go: a push delivered
	// whole is acked as it is.
	if len(delivered) > 0 && len(delivered) < len(pm.Keys) {
		if err := keepKeys(msg, pm, append(offline, failed...)); err != nil {
			return err
		}
	}
	if len(offline) > 0 {
		msg.Metadata.Set(pipeline.MetaOfflineRound, strconv.Itoa(round+1))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if len(offline) == 0 {
		return nil
	}
	return &pipeline.UndeliveredError{
		Recipients: len(offline),
		RetryUntil: s.offline.graceEnd(offline, s.grace),
		Detail:     fmt.Sprintf("keys not on %s", strings.Join(where, ", ")),
	}
}

// keyState is what became of a key in one attempt, in increasing order of
// success.
type keyState int

const (
	keyOffline keyState = iota
	keyFailed
	keyDelivered
)

func setAll(m map[string]keyState, keys []string, st keyState) {
	for _, k := range keys {
		m[k] = st
	}
}

// deliveryPlan is the keys to call per node, and which keys of the
// message each stands for when it is not the key itself.
type deliveryPlan struct {
	targets map[string][]string // server -> keys
	subs    map[string][]string // key of the message -> its user's new keys
	// mids maps keys to their users where job knows them (a mid push
	// after its first round); nil: unknown.
	mids map[string]int64
}

// protoFor is p for a node holding keys: with only the positions of the
// keys' users' streams when the plan knows them. Logic gave each node's
// message the positions of its keys' users, so in a first round, or for
// a key push moved to other nodes, p's are sent whole: they are all of
// users among the message's keys, and a node uses only its keys' users'.
func (p deliveryPlan) protoFor(proto *pb.Proto, keys []string) *pb.Proto {
	if len(p.mids) == 0 || len(proto.Positions) == 0 {
		return proto
	}
	want := map[string]bool{}
	for _, k := range keys {
		mid, ok := p.mids[k]
		if !ok {
			return proto // a key of unknown user: keep every position
		}
		want[pipeline.UserStream(mid)] = true
	}
	out := &pb.Proto{Ver: proto.Ver, Op: proto.Op, Seq: proto.Seq, Body: proto.Body, Id: proto.Id}
	for _, sp := range proto.Positions {
		if want[sp.Stream] {
			out.Positions = append(out.Positions, sp)
		}
	}
	return out
}

func (p deliveryPlan) standIns(key string) []string {
	if s, ok := p.subs[key]; ok {
		return s
	}
	return []string{key}
}

// locate groups the push's keys by the node to call: the one logic
// resolved at first; after a round that found keys offline, the one each
// is connected to now, where the registry knows. A key of a mid push also
// stands for its user: the user's keys that were not there when logic
// accepted the push (the connections made since; a client without a key
// claim gets a new key each time) are called too, and the key counts as
// delivered when any of them took the push. The registry may still list
// a key whose node was killed, until its session expires.
func (s *Stage) locate(ctx context.Context, msg *message.Message, pm *pb.PushMsg, round int) (deliveryPlan, error) {
	plan := deliveryPlan{targets: map[string][]string{}, subs: map[string][]string{}, mids: map[string]int64{}}
	if round == 0 || s.locator == nil {
		plan.targets[pm.Server] = pm.Keys
		return plan, nil
	}
	now, err := s.locator.ServersByKeys(ctx, pm.Keys)
	if err != nil {
		return plan, fmt.Errorf("locate %d offline keys: %w", len(pm.Keys), err)
	}
	midOf, acceptKeys, current, err := s.usersOf(ctx, msg, pm.Keys)
	if err != nil {
		return plan, err
	}
	added := map[string]bool{}
	add := func(server, key string) {
		if !added[key] {
			added[key] = true
			plan.targets[server] = append(plan.targets[server], key)
		}
	}
	for _, k := range pm.Keys {
		server, ok := now[k]
		if !ok {
			server = pm.Server
		}
		add(server, k)
		mid, ok := midOf[k]
		if !ok {
			continue
		}
		plan.mids[k] = mid
		for _, nk := range slices.Sorted(maps.Keys(current[mid])) {
			if !slices.Contains(acceptKeys[mid], nk) {
				plan.mids[nk] = mid
				if plan.subs[k] == nil {
					plan.subs[k] = []string{k}
				}
				plan.subs[k] = append(plan.subs[k], nk)
				add(current[mid][nk], nk)
			}
		}
	}
	return plan, nil
}

// usersOf looks up, for the keys of a mid push, their users, the users'
// keys when logic accepted the push and the users' keys now.
func (s *Stage) usersOf(ctx context.Context, msg *message.Message, keys []string) (midOf map[string]int64, acceptKeys map[int64][]string, current map[int64]map[string]string, err error) {
	if s.mids == nil {
		return nil, nil, nil, nil
	}
	acceptKeys, err = pipeline.MidKeys(msg)
	if err != nil || len(acceptKeys) == 0 {
		return nil, nil, nil, err
	}
	midOf = map[string]int64{}
	for mid, ks := range acceptKeys {
		for _, k := range ks {
			midOf[k] = mid
		}
	}
	var mids []int64
	for _, k := range keys {
		if mid, ok := midOf[k]; ok && !slices.Contains(mids, mid) {
			mids = append(mids, mid)
		}
	}
	if len(mids) == 0 {
		return midOf, acceptKeys, nil, nil
	}
	current, err = s.mids.KeysByMids(ctx, mids)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("locate the connections of %d users: %w", len(mids), err)
	}
	return midOf, acceptKeys, current, nil
}

// keepKeys rewrites msg's payload to carry only keys, in pm's order.
func keepKeys(msg *message.Message, pm *pb.PushMsg, keys []string) error {
	keep := make(map[string]bool, len(keys))
	for _, k := range keys {
		keep[k] = true
	}
	left := proto.Clone(pm).(*pb.PushMsg)
	left.Keys = slices.DeleteFunc(slices.Clone(pm.Keys), func(k string) bool { return !keep[k] })
	payload, err := proto.Marshal(left)
	if err != nil {
		return fmt.Errorf("marshal undelivered keys of %s: %w", msg.UUID, err)
	}
	msg.Payload = payload
	return nil
}

// maxOfflineKeys bounds the keys job remembers as offline: at ~100 bytes
// an entry, 100k is ~10 MB. Past it a key's grace counts from the message
// that finds it offline, as if not remembered.
const maxOfflineKeys = 100_000

// offlineKeys remembers since when each key has been found offline, so
// that a client that never comes back holds up its pushes for one grace
// period in all, not one per message: the messages that find it offline
// after that go to poison at once. A key not found offline for longer
// than its grace (and than two of the held messages' retry intervals,
// which find it offline at least that often) starts afresh: it may have
// come back and left again meanwhile without a push to show it.
type offlineKeys struct {
	mu   sync.Mutex
	keys map[string]offlineSpan
	max  int
	n    atomic.Int64 // len(keys), read without the lock on every delivery
}

// offlineSpan is when a key was first and last found offline.
type offlineSpan struct{ since, last time.Time }

func newOfflineKeys(limit int) *offlineKeys {
	return &offlineKeys{keys: map[string]offlineSpan{}, max: limit}
}

// graceEnd records keys as found offline now and returns when the last of
// their grace periods ends.
func (o *offlineKeys) graceEnd(keys []string, grace time.Duration) time.Time {
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	end := time.Time{}
	gap := max(grace, 2*pipeline.HoldMaxInterval)
	swept := false
	for _, k := range keys {
		span, ok := o.keys[k]
		if !ok || now.Sub(span.last) > gap {
			span.since = now
		}
		span.last = now
		o.record(k, span, now, gap, &swept)
		if e := span.since.Add(grace); e.After(end) {
			end = e
		}
	}
	o.n.Store(int64(len(o.keys)))
	return end
}

// record stores k's span, first dropping, when full, the entries that
// would start afresh anyway (not found offline for gap). Past the limit a
// key is not remembered: its grace counts from each message that finds it
// offline. The map is swept at most once per call of graceEnd (swept): a
// full map of fresh entries would otherwise be scanned once per key, under
// the lock, just when a node's clients are all away.
func (o *offlineKeys) record(k string, span offlineSpan, now time.Time, gap time.Duration, swept *bool) {
	if _, ok := o.keys[k]; !ok && len(o.keys) >= o.max {
		if !*swept {
			*swept = true
			maps.DeleteFunc(o.keys, func(_ string, s offlineSpan) bool { return now.Sub(s.last) > gap })
		}
		if len(o.keys) >= o.max {
			return
		}
	}
	o.keys[k] = span
}

// forget drops keys that were delivered: they are online again.
func (o *offlineKeys) forget(keys []string) {
	if len(keys) == 0 || o.n.Load() == 0 {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, k := range keys {
		delete(o.keys, k)
	}
	o.n.Store(int64(len(o.keys)))
}
