package pipeline

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// rateLog logs an event at most once per interval: a burst of one kind
// (a thousand pushes to a client that never came back, a full queue
// refusing every publish) writes one line, and the next says how many
// were left out in between.
type rateLog struct {
	logger   *slog.Logger
	level    slog.Level
	interval time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func newRateLog(logger *slog.Logger, level slog.Level, interval time.Duration) *rateLog {
	return &rateLog{logger: logger, level: level, interval: interval}
}

// log writes msg unless a line went out less than interval ago.
func (r *rateLog) log(msg string, args ...any) {
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
