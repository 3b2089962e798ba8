package pipeline

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestRateLogWritesOneLinePerIntervalAndCountsTheRest(t *testing.T) {
	var buf bytes.Buffer
	r := NewRateLog(slog.New(slog.NewTextHandler(&buf, nil)), slog.LevelWarn, time.Hour)
	for range 1000 {
		r.Log("queue full", "topic", "t")
	}
	if n := strings.Count(buf.String(), "queue full"); n != 1 {
		t.Fatalf("1000 events in one interval wrote %d lines, want 1:\n%s", n, buf.String())
	}
	// The interval passes: the next line tells how many were left out.
	r.mu.Lock()
	r.last = time.Now().Add(-2 * time.Hour)
	r.mu.Unlock()
	r.Log("queue full", "topic", "t")
	if !strings.Contains(buf.String(), "suppressed_since_last=999") {
		t.Fatalf("second line does not count the 999 suppressed events:\n%s", buf.String())
	}
}
