//go:build integration

package redisstream

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
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
			Admin: func(t *testing.T, poison, target string) pipeline.PoisonAdmin {
				a, err := NewPoisonStream(testAddr(), poison, target, nil, watermill.NopLogger{})
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
