package memory

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"imcloud/pipeline/idempotency"
	"imcloud/pipeline/idempotency/idemtest"
)

func TestRepliesContract(t *testing.T) {
	idemtest.Run(t, func(*testing.T) idempotency.Store { return NewReplies(time.Minute) })
}

// TestRepliesMemoryIsBounded: on main the store kept every reply for the
// TTL whatever its size (300 requests with 900 KB keys pinned 340 MB for
// 24 h). Keys are now capped by the API; the store caps its total and
// forgets the oldest replies first.
func TestRepliesMemoryIsBounded(t *testing.T) {
	ctx := context.Background()
	const max = 64 << 10
	s := NewRepliesLimited(time.Hour, max, slog.New(slog.DiscardHandler))
	fp := fmt.Sprintf("%064x", 1)
	reply := []byte(strings.Repeat("r", 1000))
	for i := range 1000 {
		key := fmt.Sprintf("key-%04d", i)
		e, err := s.Reserve(ctx, key, fp)
		if err != nil || e.State != idempotency.Reserved {
			t.Fatalf("reserve %s: %v %v", key, e.State, err)
		}
		if err := s.Complete(ctx, key, e.Token, reply); err != nil {
			t.Fatal(err)
		}
		if b := s.Bytes(); b > max {
			t.Fatalf("after %d replies the store holds %d bytes, over its %d cap", i+1, b, max)
		}
	}
	if e, _ := s.Reserve(ctx, "key-0999", fp); e.State != idempotency.Done {
		t.Fatalf("the newest reply was forgotten: %v", e.State)
	}
	if e, _ := s.Reserve(ctx, "key-0000", fp); e.State != idempotency.Reserved {
		t.Fatalf("the oldest reply is still held (%v) in a full store", e.State)
	}
}

// TestRepliesExpire: a reply lives for the TTL, and an abandoned
// reservation for idempotency.InFlightTTL.
func TestRepliesExpire(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	s := NewReplies(time.Hour)
	s.now = func() time.Time { return now }
	fp := fmt.Sprintf("%064x", 1)
	e, _ := s.Reserve(ctx, "done", fp)
	_ = s.Complete(ctx, "done", e.Token, []byte("r"))
	_, _ = s.Reserve(ctx, "abandoned", fp)

	now = now.Add(idempotency.InFlightTTL + time.Second)
	if e, _ := s.Reserve(ctx, "abandoned", fp); e.State != idempotency.Reserved {
		t.Fatalf("an abandoned reservation still holds its key after %s: %v", idempotency.InFlightTTL, e.State)
	}
	if e, _ := s.Reserve(ctx, "done", fp); e.State != idempotency.Done {
		t.Fatalf("a reply forgotten within its TTL: %v", e.State)
	}
	now = now.Add(time.Hour)
	if e, _ := s.Reserve(ctx, "done", fp); e.State != idempotency.Reserved {
		t.Fatalf("a reply kept past its TTL: %v", e.State)
	}
}
