package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"

	"imcloud/adapters/gochannel"
	"imcloud/pipeline/events"
)

// service is a fallback endpoint that fails the first failures calls of
// each Idempotency-Key with status, then accepts.
type service struct {
	mu       sync.Mutex
	failures int
	status   int
	tries    map[string]int
	got      []notification
}

func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := r.Header.Get("Idempotency-Key")
	s.tries[key]++
	if s.tries[key] <= s.failures {
		w.WriteHeader(s.status)
		return
	}
	var n notification
	if err := json.NewDecoder(r.Body).Decode(&n); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	s.got = append(s.got, n)
}

func (s *service) snapshot() ([]notification, map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	tries := map[string]int{}
	for k, v := range s.tries {
		tries[k] = v
	}
	return append([]notification(nil), s.got...), tries
}

// TestOfflineEventsBecomeCalls drives the consumer end to end: an emitter
// publishes events to an in-memory broker, the consumer turns the offline
// ones into calls, retrying a failing service.
func TestOfflineEventsBecomeCalls(t *testing.T) {
	tests := []struct {
		name      string
		failures  int
		status    int
		retries   int
		wantCalls int // per offline event
		wantGot   int
	}{
		{name: "accepted at once", failures: 0, status: 200, retries: 2, wantCalls: 1, wantGot: 2},
		{name: "503 twice, then accepted", failures: 2, status: 503, retries: 2, wantCalls: 3, wantGot: 2},
		{name: "429 is retried", failures: 1, status: 429, retries: 2, wantCalls: 2, wantGot: 2},
		{name: "400 is not retried", failures: 1, status: 400, retries: 3, wantCalls: 1, wantGot: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc := &service{failures: tt.failures, status: tt.status, tries: map[string]int{}}
			srv := httptest.NewServer(svc)
			defer srv.Close()

			broker := gochannel.New(watermill.NopLogger{}, 100, nil)
			defer broker.Close()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			logger := slog.New(slog.DiscardHandler)
			f := &Fallback{URL: srv.URL, Client: srv.Client(), Retries: tt.retries, Backoff: time.Millisecond, Logger: logger}
			msgs, err := broker.Subscribe(ctx, "ev")
			if err != nil {
				t.Fatal(err)
			}
			go Run(ctx, msgs, f)

			em := events.New(events.Options{Publisher: broker, Topic: "ev", Kinds: events.AllKinds(), Buffer: 16, Logger: logger})
			go em.Run(ctx)
			em.Emit(events.Event{Kind: events.Connect, Mid: 1, Key: "k"})
			em.Emit(events.Event{Kind: events.Offline, Mid: 7, MsgID: "m1", Op: 1000})
			em.Emit(events.Event{Kind: events.Delivered, Mid: 1, Key: "k", MsgID: "m0"})
			em.Emit(events.Event{Kind: events.Offline, Mid: 8, MsgID: "m1", Op: 1000})

			deadline := time.Now().Add(5 * time.Second)
			for {
				got, tries := svc.snapshot()
				if len(got) == tt.wantGot && tries["m1/7"] == tt.wantCalls && tries["m1/8"] == tt.wantCalls {
					if len(tries) != 2 {
						t.Fatalf("calls for %v, want only the two offline events", tries)
					}
					for _, n := range got {
						if n.MsgID != "m1" || n.Op != 1000 || (n.Mid != 7 && n.Mid != 8) || n.At.IsZero() {
							t.Fatalf("notification %+v", n)
						}
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("got %d notifications, tries %v; want %d, %d tries each", len(got), tries, tt.wantGot, tt.wantCalls)
				}
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
}

// A service down for longer than the retries: Handle reports the failure
// so the event goes back to the broker.
func TestFailureAfterEveryRetryIsReported(t *testing.T) {
	svc := &service{failures: 100, status: 502, tries: map[string]int{}}
	srv := httptest.NewServer(svc)
	defer srv.Close()
	f := &Fallback{URL: srv.URL, Client: srv.Client(), Retries: 2, Backoff: time.Millisecond, Logger: slog.New(slog.DiscardHandler)}
	body, _ := json.Marshal(events.Event{Kind: events.Offline, Mid: 3, MsgID: "x"})
	if err := f.Handle(context.Background(), body); err == nil {
		t.Fatal("Handle succeeded against a service that always fails")
	}
	if _, tries := svc.snapshot(); tries["x/3"] != 3 {
		t.Fatalf("tries %v, want 3 (1 + 2 retries)", tries)
	}
	if err := f.Handle(context.Background(), []byte("not json")); err != nil {
		t.Fatalf("an undecodable event must be skipped, got %v", err)
	}
}
