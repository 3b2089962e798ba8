package pipeline

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// ConfigError is returned by a handler that failed because of this node's
// own configuration, not the message: the cloud nodes refuse its calls
// (codes.Unauthenticated or PermissionDenied: a missing or wrong
// cluster.secret). Retrying the message would only poison it, and every
// message after it, so it is neither retried nor poisoned: holdConfigFault
// holds it and tries again, then hands it back to the broker, where a job
// with a good configuration may take it.
type ConfigError struct {
	// Key is the configuration key to fix.
	Key string
	Err error
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("refused because of this node's configuration (%s): %v", e.Key, e.Err)
}

func (e *ConfigError) Unwrap() error { return e.Err }

// holdTiming paces holdConfigFault.
type holdTiming struct {
	// first and max bound the wait between two attempts.
	first, max time.Duration
	// total bounds how long one delivery of a message is held before it
	// goes back to the broker. It counts in job's worst case on one
	// message (config.JobWorstCase), which validation keeps below the
	// broker's redelivery window, so that the broker does not hand a held
	// message to a second job meanwhile.
	total time.Duration
}

// A misconfigured job tries each message it holds every 5 s at most, and
// hands it back after RouterConfig.ConfigHold (config.ConfigFaultHold,
// 20 s: a sixth of the default 2 m redelivery window).
const (
	configHoldFirst = 500 * time.Millisecond
	configHoldMax   = 5 * time.Second
)

// holdConfigFault re-runs the handler while it fails with a ConfigError,
// backing off, for up to timing.total; then it returns the error, which
// the poison queue lets through (notPoison) and the router answers with a
// nack: the message goes back to the broker. The error is logged at most
// once a minute, naming the key to fix.
func holdConfigFault(logger *slog.Logger, timing holdTiming) message.HandlerMiddleware {
	refused := NewRateLog(logger, slog.LevelError, time.Minute)
	return func(h message.HandlerFunc) message.HandlerFunc {
		return holdWhile(h, timing.first, timing.max, func(msg *message.Message, err error, start time.Time) (time.Duration, bool) {
			var ce *ConfigError
			if !errors.As(err, &ce) {
				return 0, false
			}
			refused.Log("cloud nodes refuse this job's calls: fix "+ce.Key+" (the same value on every node) and restart; messages are held and handed back to the broker, not poisoned",
				"key", ce.Key, "err", ce.Err, "message_id", msg.Metadata.Get(MetaMessageID))
			return timing.total - time.Since(start), true
		})
	}
}

// holdWhile re-runs h while left says its error is one to hold the
// message for, and for how much longer (from start, the first attempt);
// the wait between attempts doubles from first up to maxWait. When the
// time is up it returns h's error. If the message's context ends while it
// waits (its subscription closing as job shuts down), the message is
// handed back to the broker (errHandedBack), never poisoned.
func holdWhile(h message.HandlerFunc, first, maxWait time.Duration, left func(msg *message.Message, err error, start time.Time) (time.Duration, bool)) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		ctx := msg.Context()
		start := time.Now()
		wait := first
		for {
			msg.SetContext(ctx)
			out, err := h(msg)
			d, held := left(msg, err, start)
			if !held || d <= 0 {
				return out, err
			}
			t := time.NewTimer(min(wait, d))
			select {
			case <-ctx.Done():
				t.Stop()
				msg.SetContext(ctx)
				return nil, fmt.Errorf("%w: %w (%w)", errHandedBack, ctx.Err(), err)
			case <-t.C:
			}
			wait = min(2*wait, maxWait)
		}
	}
}

// errHandedBack marks a held message whose subscription ended while it
// waited (job shutting down): the router nacks it and the broker gives it
// to the next job. It was never delivered or refused for its own sake.
var errHandedBack = errors.New("handed back to the broker")

// notPoison keeps messages held for a configuration fault, and held
// messages handed back at shutdown, out of the poison topic.
func notPoison(err error) bool {
	var ce *ConfigError
	return !errors.As(err, &ce) && !errors.Is(err, errHandedBack)
}
