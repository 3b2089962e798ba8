//go:build integration

package redisstream

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/poisontest"
	"imcloud/pipeline"
)

const poisonPrefix = "imcloud.test.poison."

// TestIntegrationPoisonContract runs the poison admin contract on the
// local Redis.
func TestIntegrationPoisonContract(t *testing.T) {
	t.Cleanup(func() { deleteKeys(t, poisonPrefix+"*", "imcloud:poison-claim:"+poisonPrefix+"*") })
	poisontest.Run(t, poisonPrefix, func(t *testing.T) poisontest.Broker {
		pubClient, subClient := NewClient(testAddr()), NewClient(testAddr())
		if err := pubClient.Ping(context.Background()).Err(); err != nil {
			t.Fatalf("redis %s: %v", testAddr(), err)
		}
		pub, err := NewPublisher(pubClient, watermill.NopLogger{})
		if err != nil {
			t.Fatal(err)
		}
		timing := Timing{MaxIdle: 5 * time.Second, ClaimEvery: 3 * time.Second, NackDelay: 100 * time.Millisecond}
		sub, err := NewSubscriber(subClient, watermill.NewShortUUID(), timing, watermill.NopLogger{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = pub.Close(), sub.Close() })
		return poisontest.Broker{
			Publisher: pub, Subscriber: sub, RecordsTime: true,
			Admin: func(t *testing.T, poison string, targets pipeline.ReplayTargets) pipeline.PoisonAdmin {
				a, err := NewPoisonStream(testAddr(), poison, targets, nil, watermill.NopLogger{})
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
			BoundedAdmin: func(t *testing.T, poison string, targets pipeline.ReplayTargets, limits map[string]int64) pipeline.PoisonAdmin {
				a, err := NewPoisonStream(testAddr(), poison, targets, limits, watermill.NopLogger{})
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
			Garbage: func(t *testing.T, poison string) {
				rdb := NewClient(testAddr())
				defer rdb.Close()
				err := rdb.XAdd(context.Background(), &goredis.XAddArgs{Stream: poison, Values: map[string]any{"not": "\xff\xfewatermill"}}).Err()
				if err != nil {
					t.Fatal(err)
				}
			},
		}
	})
}

func deleteKeys(t *testing.T, patterns ...string) {
	rdb := NewClient(testAddr())
	defer rdb.Close()
	ctx := context.Background()
	for _, p := range patterns {
		keys, err := rdb.Keys(ctx, p).Result()
		if err != nil {
			t.Logf("keys %s: %v", p, err)
			continue
		}
		if len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
	}
}

// afterHook calls fn after each command match picks has run.
type afterHook struct {
	match func(goredis.Cmder) bool
	fn    func()
}

func (h afterHook) DialHook(next goredis.DialHook) goredis.DialHook { return next }

func (h afterHook) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook {
	return func(ctx context.Context, cmd goredis.Cmder) error {
		err := next(ctx, cmd)
		if h.match(cmd) {
			h.fn()
		}
		return err
	}
}

func (h afterHook) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	return next
}

// TestIntegrationPoisonReplayCancelledAfterPublish: the operator's cancel
// lands right after the replay's write to the target. The message is then
// gone from the poison stream and counted, and a second replay does not
// publish it again: the target holds one copy.
func TestIntegrationPoisonReplayCancelledAfterPublish(t *testing.T) {
	unique := fmt.Sprintf("%scancel.%d", poisonPrefix, time.Now().UnixNano())
	poison, target := unique+".poison", unique+".target"
	t.Cleanup(func() { deleteKeys(t, unique+"*", "imcloud:poison-claim:"+unique+"*") })
	rdb := NewClient(testAddr())
	t.Cleanup(func() { _ = rdb.Close() })
	pub, err := NewPublisher(rdb, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	msg := message.NewMessage(watermill.NewUUID(), []byte("body"))
	msg.Metadata.Set(pipeline.MetaMessageID, "m-1")
	if err := pub.Publish(poison, msg); err != nil {
		t.Fatal(err)
	}
	a, err := NewPoisonStream(testAddr(), poison, pipeline.ReplayTargets{target}, nil, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Any command that names the target is the replay's write to it.
	a.rdb.AddHook(afterHook{
		match: func(cmd goredis.Cmder) bool { return slices.Contains(cmd.Args(), any(target)) },
		fn:    cancel,
	})
	n, err := a.Replay(ctx, pipeline.All)
	if ctx.Err() == nil {
		t.Fatalf("the hook never saw a write to %s (replay: %v, %v)", target, n, err)
	}
	if n[target] != 1 || n.Total() != 1 {
		t.Errorf("cancelled replay counted %v (err %v), want the 1 it published", n, err)
	}
	n, err = a.Replay(context.Background(), pipeline.All)
	if err != nil || n.Total() != 0 {
		t.Errorf("second replay: %v, %v; want 0", n, err)
	}
	check := NewClient(testAddr())
	defer check.Close()
	if l, err := check.XLen(context.Background(), target).Result(); err != nil || l != 1 {
		t.Errorf("target holds %d (%v), want 1 copy", l, err)
	}
	if l, err := check.XLen(context.Background(), poison).Result(); err != nil || l != 0 {
		t.Errorf("poison stream holds %d (%v), want 0", l, err)
	}
}
