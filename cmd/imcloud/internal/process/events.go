package process

import (
	"context"
	"fmt"

	"imcloud/pipeline/events"
)

// startEvents starts the events emitter when events.enabled; nil when off
// (the stages then build no event). It publishes on the process's broker
// until ctx ends: the broker closes after ctx (stop), and the emitter's
// last publishes then fail, counted.
func (p *Process) startEvents(ctx context.Context) (*events.Emitter, error) {
	cfg := p.cfg
	if !cfg.Events.Enabled {
		return nil, nil
	}
	kinds, err := events.ParseKinds(cfg.Events.Kinds)
	if err != nil {
		return nil, fmt.Errorf("events.kinds: %w", err)
	}
	e := events.New(events.Options{
		Publisher: p.broker.Publisher, Topic: cfg.Topics.Events, Kinds: kinds,
		Buffer: cfg.Events.Buffer, Logger: p.logger.With("component", "events"),
	})
	p.goLoop(e.Run, ctx)
	p.logger.Info("events on", "topic", cfg.Topics.Events, "kinds", cfg.Events.Kinds)
	return e, nil
}
