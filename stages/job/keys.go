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
// are retried, on whatever node they are connected to by then, until the
// grace period ends (pipeline.UndeliveredError); the message's payload
// keeps only the keys still undelivered, so that a retry, the poison
// queue and a replay carry no key twice.
func (s *Stage) pushKeys(ctx context.Context, msg *message.Message, pm *pb.PushMsg, p *pb.Proto, nodes map[string]string) error {
	round, _ := strconv.Atoi(msg.Metadata.Get(pipeline.MetaOfflineRound))
	targets, err := s.locate(ctx, pm, round)
	if err != nil {
		return err
	}
	if round > 0 && p.Id != "" {
		// The node remembers the id of the round that found keys offline.
		p = &pb.Proto{Ver: p.Ver, Op: p.Op, Body: p.Body, Id: p.Id + "#" + strconv.Itoa(round)}
	}
	var (
		offline, failed []string
		delivered       []string
		errs            []error
		where           []string
	)
	for _, server := range slices.Sorted(maps.Keys(targets)) {
		keys := targets[server]
		addr, ok := nodes[server]
		if !ok {
			// The node lapsed from the registry: it holds no connections.
			offline = append(offline, keys...)
			where = append(where, server+" (gone)")
			continue
		}
		c, err := s.clouds.Client(addr)
		if err != nil {
			failed = append(failed, keys...)
			errs = append(errs, err)
			continue
		}
		reply, err := c.PushMsg(ctx, &pb.PushMsgReq{Keys: keys, Proto: p})
		if err != nil {
			failed = append(failed, keys...)
			errs = append(errs, fmt.Errorf("push to %d keys on %s: %w", len(keys), server, err))
			continue
		}
		if len(reply.Offline) > 0 {
			offline = append(offline, reply.Offline...)
			where = append(where, server)
		}
		gone := make(map[string]bool, len(reply.Offline))
		for _, k := range reply.Offline {
			gone[k] = true
		}
		for _, k := range keys {
			if !gone[k] {
				delivered = append(delivered, k)
			}
		}
	}
	s.offline.forget(delivered)
	if len(delivered) > 0 {
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

// locate groups the push's keys by the node to call: the one logic
// resolved at first, and after a round that found keys offline, the one
// each is connected to now, where the registry knows.
func (s *Stage) locate(ctx context.Context, pm *pb.PushMsg, round int) (map[string][]string, error) {
	if round == 0 || s.locator == nil {
		return map[string][]string{pm.Server: pm.Keys}, nil
	}
	now, err := s.locator.ServersByKeys(ctx, pm.Keys)
	if err != nil {
		return nil, fmt.Errorf("locate %d offline keys: %w", len(pm.Keys), err)
	}
	out := map[string][]string{}
	for _, k := range pm.Keys {
		server, ok := now[k]
		if !ok {
			server = pm.Server
		}
		out[server] = append(out[server], k)
	}
	return out, nil
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
// after that go to poison at once.
type offlineKeys struct {
	mu    sync.Mutex
	since map[string]time.Time
	max   int
	n     atomic.Int64 // len(since), read without the lock on every delivery
}

func newOfflineKeys(limit int) *offlineKeys {
	return &offlineKeys{since: map[string]time.Time{}, max: limit}
}

// graceEnd records keys as offline from now, where not yet recorded, and
// returns when the last of their grace periods ends.
func (o *offlineKeys) graceEnd(keys []string, grace time.Duration) time.Time {
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	end := time.Time{}
	for _, k := range keys {
		t, ok := o.since[k]
		if !ok {
			t = now
			o.record(k, now, grace)
		}
		if e := t.Add(grace); e.After(end) {
			end = e
		}
	}
	return end
}

// record adds k, first dropping entries well past their grace when full.
func (o *offlineKeys) record(k string, now time.Time, grace time.Duration) {
	if len(o.since) >= o.max {
		// A key offline for twice its grace sends its messages straight to
		// poison either way; forgetting it costs one more grace period at
		// most, if it is found offline again.
		maps.DeleteFunc(o.since, func(_ string, t time.Time) bool { return now.Sub(t) > 2*grace })
	}
	if len(o.since) < o.max {
		o.since[k] = now
	}
	o.n.Store(int64(len(o.since)))
}

// forget drops keys that were delivered: they are online again.
func (o *offlineKeys) forget(keys []string) {
	if len(keys) == 0 || o.n.Load() == 0 {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, k := range keys {
		delete(o.since, k)
	}
	o.n.Store(int64(len(o.since)))
}
