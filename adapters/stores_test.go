package adapters

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
)

// TestMemoryRepliesFollowConfigAndLogger: the in-memory idempotency store
// holds logic.idempotency_max_bytes and warns on the process's logger. On
// main its cap was a constant and it logged through slog.Default().
func TestMemoryRepliesFollowConfigAndLogger(t *testing.T) {
	var logs logtest.Buffer
	all := config.Default()
	all.Logic.IdempotencyMaxBytes = 4096
	cfg := all.Logic
	stores, err := OpenStores(context.Background(), all, slog.New(slog.NewJSONHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s, ok := stores.Replies.(*memory.Replies)
	if !ok {
		t.Fatalf("registry.kind memory opened replies %T, want *memory.Replies", stores.Replies)
	}
	ctx := context.Background()
	for _, key := range []string{"a", "b"} {
		e, err := s.Reserve(ctx, key, strings.Repeat("f", 64))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Complete(ctx, key, e.Token, make([]byte, 3000)); err != nil {
			t.Fatal(err)
		}
	}
	if s.Bytes() > cfg.IdempotencyMaxBytes {
		t.Fatalf("store holds %d bytes, logic.idempotency_max_bytes is %d", s.Bytes(), cfg.IdempotencyMaxBytes)
	}
	if got := logs.String(); !strings.Contains(got, "idempotency store full") || !strings.Contains(got, `"max_bytes":4096`) || !strings.Contains(got, `"stage":"logic"`) {
		t.Fatalf("the node's logger got %q, want the store's warning naming max_bytes 4096", got)
	}
}

// TestOpenStoresHistory: registry.kind memory keeps the history in memory,
// a working store.
func TestOpenStoresHistory(t *testing.T) {
	stores, err := OpenStores(t.Context(), config.Default(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stores.Close() })
	if _, ok := stores.History.(*memory.History); !ok {
		t.Fatalf("registry.kind memory opened history %T, want *memory.History", stores.History)
	}
	ps, err := stores.History.Append(t.Context(), []string{"room:live://1"}, pipeline.HistoryEntry{ID: "m"}, func(string) pipeline.StreamLimit {
		return pipeline.StreamLimit{Size: 10}
	})
	if err != nil || ps[0].Pos != 1 {
		t.Fatalf("Append: %v %v", ps, err)
	}
}

// TestOpenStoresHistoryDisabled: history.enabled = false opens no history
// store, so logic gives no positions (the Redis registry reads the same
// switch; its case is in stores_integration_test.go).
func TestOpenStoresHistoryDisabled(t *testing.T) {
	cfg := config.Default()
	cfg.History.Enabled = false
	stores, err := OpenStores(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stores.Close() })
	if stores.History != nil {
		t.Fatalf("history.enabled = false opened history %T, want none", stores.History)
	}
	if stores.Registry == nil || stores.Replies == nil {
		t.Fatalf("history.enabled = false must still open the registry and replies: %+v", stores)
	}
}

// TestMemoryHistoryFollowsCapsAndLogger: history.max_streams and
// history.max_bytes cap the in-memory history, which logs its evictions
// on the process's logger. Before, the store had no global cap.
func TestMemoryHistoryFollowsCapsAndLogger(t *testing.T) {
	for _, tt := range []struct {
		name       string
		set        func(*config.Config)
		maxStreams int64
		maxBytes   int64
	}{
		{"streams", func(c *config.Config) { c.History.MaxStreams = 1000 }, 1000, 512 << 20},
		{"bytes", func(c *config.Config) { c.History.MaxBytes = 8 << 20 }, 1_000_000, 8 << 20},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs logtest.Buffer
			cfg := config.Default()
			tt.set(&cfg)
			stores, err := OpenStores(t.Context(), cfg, slog.New(slog.NewJSONHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			h, ok := stores.History.(*memory.History)
			if !ok {
				t.Fatalf("registry.kind memory opened history %T, want *memory.History", stores.History)
			}
			limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: time.Hour} }
			body := make([]byte, 1000)
			names := make([]string, pipeline.MaxHistoryStreams)
			for round := range 20 {
				for i := range names {
					names[i] = fmt.Sprintf("user:%d-%d", round, i)
				}
				if _, err := h.Append(t.Context(), names, pipeline.HistoryEntry{Body: body}, limit); err != nil {
					t.Fatal(err)
				}
			}
			streams, bytes := h.Size()
			if streams > tt.maxStreams || bytes > tt.maxBytes || h.Evictions() == 0 {
				t.Fatalf("%d streams, %d bytes, %d evicted; caps %d streams, %d bytes", streams, bytes, h.Evictions(), tt.maxStreams, tt.maxBytes)
			}
			if out := logs.String(); !strings.Contains(out, `"component":"history"`) || !strings.Contains(out, `"evicted_total"`) {
				t.Fatalf("no eviction logged on the process logger: %s", out)
			}
		})
	}
}
