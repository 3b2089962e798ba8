// Package dedupetest is the contract every job deduplication store
// (pipeline.DedupeStore) passes: adapters/memory for one job,
// adapters/redis for several.
package dedupetest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"imcloud/pipeline"
)

// Factory returns an empty store that remembers an id for ttl.
type Factory func(t *testing.T, ttl time.Duration) pipeline.DedupeStore

// Run runs the contract against stores from newStore.
func Run(t *testing.T, newStore Factory) {
	ctx := context.Background()
	t.Run("marked ids only", func(t *testing.T) {
		s := newStore(t, time.Minute)
		if seen := delivered(t, s, "a"); seen {
			t.Fatal("an id never marked is delivered")
		}
		if err := s.MarkDelivered(ctx, "a", time.Minute); err != nil {
			t.Fatal(err)
		}
		if !delivered(t, s, "a") {
			t.Fatal("a marked id is not delivered")
		}
		// Ids are compared whole: neither a prefix nor an extension of
		// a marked id counts, nor the same text in another case.
		for _, other := range []string{"", "A", "a ", "ab", "b"} {
			if delivered(t, s, other) {
				t.Fatalf("id %q delivered after only %q was marked", other, "a")
			}
		}
	})
	t.Run("many ids", func(t *testing.T) {
		s := newStore(t, time.Minute)
		for i := range 1000 {
			if i%2 == 0 {
				if err := s.MarkDelivered(ctx, fmt.Sprint("m-", i), time.Minute); err != nil {
					t.Fatal(err)
				}
			}
		}
		for i := range 1000 {
			if got, want := delivered(t, s, fmt.Sprint("m-", i)), i%2 == 0; got != want {
				t.Fatalf("id m-%d delivered = %v, want %v", i, got, want)
			}
		}
	})
	t.Run("expiry", func(t *testing.T) {
		const ttl = time.Second
		s := newStore(t, ttl)
		if err := s.MarkDelivered(ctx, "x", ttl); err != nil {
			t.Fatal(err)
		}
		if !delivered(t, s, "x") {
			t.Fatal("a marked id is not delivered")
		}
		// A store keeps an id at least ttl and forgets it in time: the
		// memory store within two rounds of its ttl.
		deadline := time.Now().Add(5 * ttl)
		for delivered(t, s, "x") {
			if time.Now().After(deadline) {
				t.Fatalf("id still delivered %s after its ttl of %s", 5*ttl, ttl)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

func delivered(t *testing.T, s pipeline.DedupeStore, id string) bool {
	t.Helper()
	seen, err := s.Delivered(context.Background(), id)
	if err != nil {
		t.Fatalf("Delivered(%q): %v", id, err)
	}
	return seen
}
