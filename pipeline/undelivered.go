package pipeline

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// ReasonRecipientsOffline starts the poison reason of a push whose
// recipients were online when logic accepted it but stayed offline through
// job's grace period (job.offline_grace).
const ReasonRecipientsOffline = "recipients offline"

// UndeliveredError is returned by a handler that reached some recipients
// of a message but not others: they were not connected. It is no failure
// of the broker or of a cloud node, so the Retry middleware leaves it to
// holdUndelivered, which waits for the recipients until RetryUntil.
type UndeliveredError struct {
	// Recipients is how many recipients are still undelivered.
	Recipients int
	// RetryUntil is when their grace ends; zero or past means give up.
	RetryUntil time.Time
	// Detail says where they were expected.
	Detail string
}

func (e *UndeliveredError) Error() string {
	return fmt.Sprintf("%s: %d not connected (%s)", ReasonRecipientsOffline, e.Recipients, e.Detail)
}

// HoldMaxInterval bounds the wait between two attempts at recipients who
// are offline: a client that reconnects gets its backlog within about
// this long, and each held message costs one cloud call per interval.
const (
	holdFirst       = 200 * time.Millisecond
	HoldMaxInterval = 2 * time.Second
)

// holdUndelivered re-runs the handler while it reports recipients offline
// within their grace, backing off up to HoldMaxInterval. Past the grace it returns
// the error, and the poison queue records the message with the reason
// "recipients offline" and only the recipients still undelivered (the
// handler keeps the message's payload to those). Waiting ends early when
// the message's context ends (its subscription closing), and the message
// goes back to the broker.
func holdUndelivered(logger *slog.Logger) message.HandlerMiddleware {
	gaveUp := NewRateLog(logger, slog.LevelWarn, 10*time.Second)
	return func(h message.HandlerFunc) message.HandlerFunc {
		return holdWhile(h, holdFirst, HoldMaxInterval, func(msg *message.Message, err error, _ time.Time) (time.Duration, bool) {
			var u *UndeliveredError
			if !errors.As(err, &u) {
				return 0, false
			}
			left := time.Until(u.RetryUntil)
			if left <= 0 {
				gaveUp.Log("push undelivered: recipients stayed offline past the grace period; sent to the poison topic",
					"message_id", msg.Metadata.Get(MetaMessageID), "recipients", u.Recipients, "detail", u.Detail)
			}
			return left, true
		})
	}
}

// retryable keeps the Retry middleware from retrying undelivered
// recipients, which holdUndelivered paces over the grace period, and a
// configuration fault, which holdConfigFault holds: neither counts as a
// failed attempt.
func retryable(err error) bool {
	var u *UndeliveredError
	var ce *ConfigError
	return !errors.As(err, &u) && !errors.As(err, &ce)
}
