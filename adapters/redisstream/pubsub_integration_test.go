//go:build integration

package redisstream

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/pubsubtest"
)

func testAddr() string {
	if a := os.Getenv("IMCLOUD_TEST_REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
}

// TestIntegrationUniversalPubSub runs Watermill's Pub/Sub test suite
// against the adapter on the local Redis.
func TestIntegrationUniversalPubSub(t *testing.T) {
	t.Cleanup(func() {
		rdb := NewClient(testAddr())
		defer rdb.Close()
		ctx := context.Background()
		keys, _ := rdb.Keys(ctx, pubsubtest.Prefix+"*").Result()
		if len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
	})
	pubsubtest.Run(t, func(t *testing.T) (message.Publisher, message.Subscriber) {
		// Publisher and subscriber each close their client.
		pubClient, subClient := NewClient(testAddr()), NewClient(testAddr())
		if err := pubClient.Ping(context.Background()).Err(); err != nil {
			t.Fatalf("redis %s: %v", testAddr(), err)
		}
		pub, err := NewPublisher(pubClient, watermill.NopLogger{})
		if err != nil {
			t.Fatal(err)
		}
		// Short timings, as Watermill's own tests of the adapter use.
		timing := Timing{MaxIdle: 5 * time.Second, ClaimEvery: 3 * time.Second, NackDelay: 100 * time.Millisecond}
		sub, err := NewSubscriber(subClient, watermill.NewShortUUID(), timing, watermill.NopLogger{})
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	})
}
