package pipeline

import (
	"fmt"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"imcloud/config"
)

// NewRouter returns a router whose handlers run inside the delivery
// middleware stack. The order is what makes delivery correct; Watermill
// wraps the first middleware added outermost:
//
//	CorrelationID  copies the correlation id onto anything a handler emits
//	PoisonQueue    a message that failed every retry goes to the poison topic with its reason, then is acked
//	Retry          retries the failed attempt with exponential backoff, up to job.retry.max_retries
//	Timeout        bounds each attempt by job.timeout (a fresh context per retry)
//	Recoverer      turns a handler panic into an error the layers above see
func NewRouter(cfg config.Job, poisonTopic string, poisonPub message.Publisher, logger *slog.Logger) (*message.Router, error) {
	wlog := WatermillLogger(logger)
	r, err := message.NewRouter(message.RouterConfig{}, wlog)
	if err != nil {
		return nil, fmt.Errorf("create router: %w", err)
	}
	poison, err := middleware.PoisonQueue(poisonPub, poisonTopic)
	if err != nil {
		return nil, fmt.Errorf("create poison queue middleware: %w", err)
	}
	r.AddMiddleware(
		middleware.CorrelationID,
		poison,
		middleware.Retry{
			MaxRetries:          cfg.Retry.MaxRetries,
			InitialInterval:     cfg.Retry.InitialInterval,
			MaxInterval:         cfg.Retry.MaxInterval,
			Multiplier:          cfg.Retry.Multiplier,
			ResetContextOnRetry: true,
			Logger:              wlog,
		}.Middleware,
		middleware.Timeout(cfg.Timeout),
		middleware.Recoverer,
	)
	return r, nil
}
