package pipeline

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"imcloud/adapters/amqp"
	"imcloud/pipeline/config"
)

// poisonKeys are the metadata keys the poison queue middleware adds, which
// a replayed message sheds.
func poisonKeys() []string {
	return []string{middleware.ReasonForPoisonedKey, middleware.PoisonedTopicKey, middleware.PoisonedHandlerKey, middleware.PoisonedSubscriberKey}
}

// Poison lets an operator list, replay and purge poisoned messages.
type Poison struct {
	queue  *amqp.PoisonQueue
	cfg    config.Config
	logger *slog.Logger
}

// OpenPoison opens the poison topic of the configured broker.
func OpenPoison(cfg config.Config, logger *slog.Logger) (*Poison, error) {
	if cfg.Broker.Kind != config.BrokerAMQP {
		return nil, fmt.Errorf("broker.kind %q: poison tooling works on the amqp broker (the embedded broker's poison topic lives only inside its process)", cfg.Broker.Kind)
	}
	q := amqp.NewPoisonQueue(cfg.Broker.AMQP.URL, cfg.Topics.Poison, MetaMessageID)
	q.MaxLength = cfg.Topics.PoisonMaxLength
	return &Poison{queue: q, cfg: cfg, logger: logger}, nil
}

// List returns the poisoned messages, leaving them in place.
func (p *Poison) List(ctx context.Context) ([]amqp.Poisoned, error) { return p.queue.List(ctx) }

// Purge drops the selected messages.
func (p *Poison) Purge(ctx context.Context, sel amqp.Selector) (int, error) {
	return p.queue.Purge(ctx, sel)
}

// Replay re-publishes the selected messages to the push topic.
func (p *Poison) Replay(ctx context.Context, sel amqp.Selector) (int, error) {
	pub, err := amqp.NewBoundedPublisher(p.cfg.Broker.AMQP.URL, WatermillLogger(p.logger), 1, amqp.Limits(maxLengths(p.cfg.Topics)), p.cfg.Topics.Push)
	if err != nil {
		return 0, err
	}
	defer pub.Close()
	return p.queue.Replay(ctx, sel, pub, p.cfg.Topics.Push, poisonKeys()...)
}
