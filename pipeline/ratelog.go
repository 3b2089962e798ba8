package pipeline

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// RateLog logs an event at most once per interval: a burst of one kind
// (a thousand pushes to a client that never came back, a full queue
// refusing every publish) writes one line, and the next says how many
// were left out in between.
type RateLog struct {
	logger   *slog.Logger
	level    slog.Level
	interval time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// NewRateLog logs at level, at most one line per interval.
func NewRateLog(logger *slog.Logger, level slog.Level, interval time.Duration) *RateLog {
	return &RateLog{logger: logger, level: level, interval: interval}
}

// Log writes msg unless a line went out less than interval ago.
func (r *RateLog) Log(msg string, args ...any) {
	r.mu.Lock()
	now := time.Now()
	if !r.last.IsZero() && now.Sub(r.last) < r.interval {
		r.suppressed++
		r.mu.Unlock()
		return
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	r.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed_since_last", n)
	}
	r.logger.Log(context.Background(), r.level, msg, args...)
}
