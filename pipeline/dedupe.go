package pipeline

import (
	"context"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// DedupeStore remembers the ids of messages that were delivered.
// adapters/memory keeps them for one job; adapters/redis shares them
// between jobs.
type DedupeStore interface {
	Delivered(ctx context.Context, id string) (bool, error)
	MarkDelivered(ctx context.Context, id string, ttl time.Duration) error
}

// InProcess is implemented by a store (dedupe, registry, history,
// idempotency) that answers from this process's memory and never blocks.
// What calls it may then skip what only a remote store needs: the dedupe
// middleware bounds no call by SettleTimeout (two timer contexts per
// message were 6 % of a standalone node's CPU at 80k pushes/s, pprof), and
// logic runs a batch's lookups one after another instead of overlapping
// them on goroutines.
type InProcess interface {
	InProcess()
}

// IsInProcess reports whether every store given is InProcess; a nil one
// (not configured) counts as in process.
func IsInProcess(stores ...any) bool {
	for _, s := range stores {
		if s == nil {
			continue
		}
		if _, ok := s.(InProcess); !ok {
			return false
		}
	}
	return true
}

// dedupe drops a message whose id was already delivered, and marks an id
// delivered only once its handler succeeded. Watermill's Deduplicator marks
// an id as soon as it is seen, so a message whose handling failed (a broker
// redelivery, a poison replay) would be dropped as a duplicate and lost.
// Keyed on the message-id metadata, never the payload: two pushes of the
// same text are two messages.
func dedupe(store DedupeStore, ttl time.Duration, logger *slog.Logger, observe func(string)) message.HandlerMiddleware {
	bounded := func(ctx context.Context) (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, SettleTimeout)
	}
	if _, ok := store.(InProcess); ok {
		bounded = func(ctx context.Context) (context.Context, context.CancelFunc) { return ctx, func() {} }
	}
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			id := msg.Metadata.Get(MetaMessageID)
			if id == "" {
				return h(msg)
			}
			// The layers inside leave a cancelled context on the message;
			// each store call is bounded, for it counts in job's worst case
			// on one message (SettleTimeout).
			ctx := msg.Context()
			dctx, cancel := bounded(ctx)
			seen, err := store.Delivered(dctx, id)
			cancel()
			if err != nil {
				// Delivering twice beats not delivering: go on.
				logger.Warn("dedupe store unavailable; delivering without the check", "message_id", id, "err", err)
			}
			if seen {
				logger.Debug("dropping duplicate message", "message_id", id)
				observe("duplicate")
				return nil, nil
			}
			out, err := h(msg)
			if err != nil {
				return nil, err
			}
			mctx, cancel := bounded(ctx)
			defer cancel()
			if err := store.MarkDelivered(mctx, id, ttl); err != nil {
				logger.Warn("remember delivered message", "message_id", id, "err", err)
			}
			return out, nil
		}
	}
}

// keepContext gives the message back the context it arrived with once the
// layers inside are done: Timeout leaves a cancelled one behind, and the
// poison queue must not publish with it.
func keepContext(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		ctx := msg.Context()
		defer msg.SetContext(ctx)
		return h(msg)
	}
}
