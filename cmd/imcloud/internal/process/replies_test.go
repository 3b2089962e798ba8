package process

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"imcloud/pipeline/config"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestMemoryRepliesFollowConfigAndLogger: the in-memory idempotency store
// holds logic.idempotency_max_bytes and warns on the node's logger. On
// main its cap was a constant and it logged through slog.Default().
func TestMemoryRepliesFollowConfigAndLogger(t *testing.T) {
	var logs syncBuffer
	cfg := config.Default().Logic
	cfg.IdempotencyMaxBytes = 4096
	s := memoryReplies(cfg, slog.New(slog.NewJSONHandler(&logs, nil)))
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
