package job

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"imcloud/pipeline"
)

// TestCanaryFailuresCounted: canaries a job cannot hand to every cloud
// node count up, in a row, with the last error; one that reaches them all
// resets the count.
func TestCanaryFailuresCounted(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close() // nothing listens there now
	s := New(Options{Nodes: StaticNodes{dead}, Logger: slog.New(slog.DiscardHandler), Timeout: time.Second})
	defer s.Close()
	for i := 1; i <= 2; i++ {
		msg, err := pipeline.NewCanaryMessage("test")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		msg.SetContext(ctx)
		if err := s.handle(msg); err != nil {
			t.Fatalf("a canary failed its message: %v", err)
		}
		cancel()
		if n, e := s.CanaryFailures(); n != int64(i) || e == "" {
			t.Fatalf("after %d failed canaries: %d, %q", i, n, e)
		}
	}
	s.nodes, s.list = StaticNodes{}, StaticNodes{} // no node: every node (none) took it
	msg, _ := pipeline.NewCanaryMessage("test")
	msg.SetContext(context.Background())
	_ = s.handle(msg)
	if n, _ := s.CanaryFailures(); n != 0 {
		t.Fatalf("a canary every node took left %d failures", n)
	}
}
