package pipeline

import (
	"errors"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
)

// Broker is the publisher and subscriber of one broker connection.
type Broker struct {
	Publisher  message.Publisher
	Subscriber message.Subscriber
	// SharedQueue is true when several subscriptions to one topic share its
	// messages (a work queue) rather than each receiving all of them.
	SharedQueue bool
	closers     []func() error
	refused     *refusals
}

// NewBroker is the broker of an adapter's publisher and subscriber; close
// releases what the adapter opened. Publishes a full queue refuses (an
// error wrapping ErrQueueFull) are counted in Refused and logged at most
// once per interval.
func NewBroker(pub message.Publisher, sub message.Subscriber, sharedQueue bool, logger *slog.Logger, close ...func() error) *Broker {
	b := &Broker{Subscriber: sub, SharedQueue: sharedQueue, closers: close}
	b.Publisher, b.refused = bound(pub, logger)
	return b
}

// Close closes the publisher and subscriber.
func (b *Broker) Close() error {
	var errs []error
	for _, c := range b.closers {
		errs = append(errs, c())
	}
	return errors.Join(errs...)
}
