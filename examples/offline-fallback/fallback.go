package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline/events"
)

// Fallback POSTs offline events to URL.
type Fallback struct {
	URL     string
	Client  *http.Client
	Retries int           // retries after the first attempt
	Backoff time.Duration // first wait between attempts, doubled each retry
	Logger  *slog.Logger
}

// notification is the body of a fallback call.
type notification struct {
	Mid   int64     `json:"mid"`
	MsgID string    `json:"msg_id"`
	Op    int32     `json:"op,omitempty"`
	At    time.Time `json:"at"`
}

// errPermanent marks a call the service refused for good (4xx).
var errPermanent = errors.New("refused")

// Run consumes msgs (the events topic's subscription) until it closes:
// offline events become calls, other kinds are acked and skipped.
func Run(ctx context.Context, msgs <-chan *message.Message, f *Fallback) {
	for m := range msgs {
		if err := f.Handle(ctx, m.Payload); err != nil {
			m.Nack() // the broker redelivers it
			continue
		}
		m.Ack()
	}
}

// Handle makes the fallback call of one event; an error means the event
// should be redelivered.
func (f *Fallback) Handle(ctx context.Context, payload []byte) error {
	ev, err := events.Decode(payload)
	if err != nil {
		// Redelivering will not make it decode.
		f.Logger.Warn("skipping an event that does not decode", "err", err)
		return nil
	}
	if ev.Kind != events.Offline {
		return nil
	}
	body, _ := json.Marshal(notification{Mid: ev.Mid, MsgID: ev.MsgID, Op: ev.Op, At: ev.At})
	idem := ev.MsgID + "/" + strconv.FormatInt(ev.Mid, 10)
	wait := f.Backoff
	for attempt := 0; ; attempt++ {
		err = f.call(ctx, body, idem)
		switch {
		case err == nil:
			f.Logger.Info("fallback sent", "mid", ev.Mid, "msg_id", ev.MsgID, "attempts", attempt+1)
			return nil
		case errors.Is(err, errPermanent):
			f.Logger.Error("fallback refused; dropped", "mid", ev.Mid, "msg_id", ev.MsgID, "err", err)
			return nil
		case attempt >= f.Retries:
			f.Logger.Error("fallback failed after every retry; the event goes back to the broker", "mid", ev.Mid, "msg_id", ev.MsgID, "attempts", attempt+1, "err", err)
			return err
		}
		f.Logger.Warn("fallback failed; retrying", "mid", ev.Mid, "msg_id", ev.MsgID, "attempt", attempt+1, "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait *= 2
	}
}

func (f *Fallback) call(ctx context.Context, body []byte, idem string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.URL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("%w: %w", errPermanent, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", idem)
	resp, err := f.Client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	switch {
	case resp.StatusCode < 300:
		return nil
	case resp.StatusCode >= 400 && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusRequestTimeout:
		return fmt.Errorf("%w: %s", errPermanent, resp.Status)
	default:
		return fmt.Errorf("%s", resp.Status)
	}
}
