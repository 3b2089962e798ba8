//go:build integration

package redis

import (
	"context"
	"fmt"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline/idempotency"
	"imcloud/pipeline/idempotency/idemtest"
)

func TestIntegrationRepliesContract(t *testing.T) {
	eachSetup(t, func(t *testing.T, rdb goredis.UniversalClient) {
		idemtest.Run(t, func(t *testing.T) idempotency.Store {
			prefix := registrytest.Prefix(t) + "reply:"
			t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
			return NewReplies(rdb, prefix, time.Minute)
		})
	})
}

// TestIntegrationRepliesAcrossNodes: two logic nodes share one Redis; a
// key reserved on one is in flight on the other, and what one stored the
// other replays, for the TTL.
func TestIntegrationRepliesAcrossNodes(t *testing.T) {
	ctx := context.Background()
	rdb := connect(t, setup(t, "single"))
	prefix := registrytest.Prefix(t) + "reply:"
	t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
	a, b := NewReplies(rdb, prefix, 10*time.Minute), NewReplies(rdb, prefix, 10*time.Minute)
	fp := fmt.Sprintf("%064x", 7)
	e, err := a.Reserve(ctx, "k", fp)
	if err != nil || e.State != idempotency.Reserved {
		t.Fatalf("reserve on a: %v %v", e.State, err)
	}
	if ttl := rdb.PTTL(ctx, a.redisKey("k")).Val(); ttl <= 0 || ttl > idempotency.InFlightTTL {
		t.Fatalf("in-flight marker TTL %s, want up to %s", ttl, idempotency.InFlightTTL)
	}
	if got, err := b.Reserve(ctx, "k", fp); err != nil || got.State != idempotency.InFlight || got.Fingerprint != fp {
		t.Fatalf("reserve on b while a holds the key: %+v %v", got, err)
	}
	if err := a.Complete(ctx, "k", e.Token, []byte(`{"code":0}`)); err != nil {
		t.Fatal(err)
	}
	got, err := b.Reserve(ctx, "k", fp)
	if err != nil || got.State != idempotency.Done || string(got.Reply) != `{"code":0}` || got.Fingerprint != fp {
		t.Fatalf("reserve on b after a completed: %+v %v", got, err)
	}
	if ttl := rdb.PTTL(ctx, a.redisKey("k")).Val(); ttl <= idempotency.InFlightTTL || ttl > 10*time.Minute {
		t.Fatalf("reply TTL %s, want the store's 10m", ttl)
	}
}
