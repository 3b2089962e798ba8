// Package idemtest is the contract every idempotency.Store passes.
package idemtest

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"imcloud/pipeline/idempotency"
)

// Run checks a store made by newStore. Keys are unique per run, so a
// shared backend (Redis) needs no cleanup between subtests.
func Run(t *testing.T, newStore func(t *testing.T) idempotency.Store) {
	ctx := context.Background()
	fpA, fpB := fmt.Sprintf("%064x", 1), fmt.Sprintf("%064x", 2)
	reserve := func(t *testing.T, s idempotency.Store, key, fp string, want idempotency.State) idempotency.Entry {
		t.Helper()
		e, err := s.Reserve(ctx, key, fp)
		if err != nil {
			t.Fatalf("reserve %q: %v", key, err)
		}
		if e.State != want {
			t.Fatalf("reserve %q: %s, want %s", key, e.State, want)
		}
		return e
	}

	t.Run("a held key is in flight with the holder's fingerprint", func(t *testing.T) {
		s := newStore(t)
		first := reserve(t, s, "k", fpA, idempotency.Reserved)
		if first.Token == "" {
			t.Fatal("a reservation without a token")
		}
		if e := reserve(t, s, "k", fpB, idempotency.InFlight); e.Fingerprint != fpA {
			t.Fatalf("in-flight fingerprint %q, want the holder's %q", e.Fingerprint, fpA)
		}
		reserve(t, s, "other", fpA, idempotency.Reserved)
	})

	t.Run("a completed key replays its reply and fingerprint", func(t *testing.T) {
		s := newStore(t)
		e := reserve(t, s, "k", fpA, idempotency.Reserved)
		if err := s.Complete(ctx, "k", e.Token, []byte(`{"code":0}`)); err != nil {
			t.Fatal(err)
		}
		got := reserve(t, s, "k", fpB, idempotency.Done)
		if got.Fingerprint != fpA || string(got.Reply) != `{"code":0}` {
			t.Fatalf("done entry %+v, want fingerprint %q and the stored reply", got, fpA)
		}
	})

	t.Run("a released key can be reserved again", func(t *testing.T) {
		s := newStore(t)
		e := reserve(t, s, "k", fpA, idempotency.Reserved)
		if err := s.Release(ctx, "k", e.Token); err != nil {
			t.Fatal(err)
		}
		again := reserve(t, s, "k", fpB, idempotency.Reserved)
		if again.Token == e.Token {
			t.Fatal("a new reservation reuses the old token")
		}
		// The first holder's late release must not free the new holder's key.
		if err := s.Release(ctx, "k", e.Token); err != nil {
			t.Fatal(err)
		}
		reserve(t, s, "k", fpA, idempotency.InFlight)
		if err := s.Complete(ctx, "k", e.Token, []byte("stale")); err != nil {
			t.Fatal(err)
		}
		reserve(t, s, "k", fpA, idempotency.InFlight)
	})

	t.Run("concurrent reservations: exactly one wins", func(t *testing.T) {
		s := newStore(t)
		const n = 16
		var wg sync.WaitGroup
		states := make([]idempotency.State, n)
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() {
				e, err := s.Reserve(ctx, "race", fpA)
				states[i], errs[i] = e.State, err
			})
		}
		wg.Wait()
		won := 0
		for i := range n {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			if states[i] == idempotency.Reserved {
				won++
			}
		}
		if won != 1 {
			t.Fatalf("%d of %d concurrent reservations won, want 1", won, n)
		}
	})
}
