package config

import (
	"strings"
	"testing"
	"time"
)

// TestJobWorstCase: the sum follows the middleware that runs, term by term.
func TestJobWorstCase(t *testing.T) {
	tests := []struct {
		name        string
		sets        []string
		wantBackoff time.Duration
		want        time.Duration
	}{
		// Sleeps 0.2 + 0.8 + 3.2 + 5 + 5 (Watermill draws twice per retry).
		{"defaults", nil, 14200 * time.Millisecond, 35*time.Second + 30*time.Second + 6*5*time.Second + 14200*time.Millisecond},
		{"no retries", []string{"job.retry.max_retries=0"}, 0, 35*time.Second + 30*time.Second + 5*time.Second},
		{"no grace", []string{"job.offline_grace=0s"}, 14200 * time.Millisecond, 35*time.Second + 6*5*time.Second + 14200*time.Millisecond},
		// One retry: 100ms is drawn for ShouldRetry, 200ms slept.
		{"one retry", []string{"job.retry.max_retries=1", "job.offline_grace=0s"}, 200 * time.Millisecond, 35*time.Second + 2*5*time.Second + 200*time.Millisecond},
		{"constant backoff", []string{"job.retry.max_retries=3", "job.retry.multiplier=1", "job.retry.initial_interval=1s", "job.offline_grace=0s"}, 3 * time.Second, 35*time.Second + 4*5*time.Second + 3*time.Second},
		// Past the cap every sleep is max_interval, however many retries.
		{"many retries", []string{"job.retry.max_retries=1000000", "job.offline_grace=0s", "job.timeout=1ms"}, 200*time.Millisecond + 800*time.Millisecond + 3200*time.Millisecond + (1000000-3)*5*time.Second, 35*time.Second + 1000001*time.Millisecond + 200*time.Millisecond + 800*time.Millisecond + 3200*time.Millisecond + (1000000-3)*5*time.Second},
		// On RabbitMQ each of the 4 consumers holds up to 16 deliveries
		// (prefetch), each a bundle of up to 256 pushes: 16,384 at 8,000
		// per second.
		{"throttle amqp", []string{"job.throttle=8000"}, 14200 * time.Millisecond, 2048*time.Millisecond + 35*time.Second + 30*time.Second + 6*5*time.Second + 14200*time.Millisecond},
		{"throttle gochannel", []string{"job.throttle=32", "broker.kind=gochannel"}, 14200 * time.Millisecond, 35*time.Second + 30*time.Second + 6*5*time.Second + 14200*time.Millisecond},
		// Every unacked message of the consumer (MaxAckPending 1000), each
		// a bundle of up to 256, may wait in this job's throttle: 256,000
		// at 25,000 per second.
		{"throttle nats", []string{"job.throttle=25000", "broker.kind=nats"}, 14200 * time.Millisecond, 10240*time.Millisecond + 35*time.Second + 30*time.Second + 6*5*time.Second + 14200*time.Millisecond},
		// Redis Streams hands each of the 4 subscriptions one message (a
		// bundle of up to 256) at a time.
		{"throttle redisstream", []string{"job.throttle=1000", "broker.kind=redisstream"}, 14200 * time.Millisecond, 1024*time.Millisecond + 35*time.Second + 30*time.Second + 6*5*time.Second + 14200*time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := loadUnchecked(t, tt.sets)
			w := cfg.JobWorstCase()
			if got := cfg.Job.RetryBackoff(); got != tt.wantBackoff {
				t.Errorf("RetryBackoff() = %s, want %s", got, tt.wantBackoff)
			}
			if got := w.Total(); got != tt.want {
				t.Errorf("JobWorstCase().Total() = %s (%s), want %s", got, w, tt.want)
			}
		})
	}
}

// loadUnchecked loads the defaults with sets, not validating them.
func loadUnchecked(t *testing.T, sets []string) Config {
	t.Helper()
	cfg, err := Load(Sources{Sets: append([]string{"job.dedupe.ttl=200000h", "cloud.dedupe_ttl=100000h", "broker.amqp.redeliver_after=100000h", "broker.nats.redeliver_after=100000h", "broker.redisstream.redeliver_after=100000h"}, sets...), Defaults: withSecret})
	if err != nil {
		t.Fatalf("Load %v: %v", sets, err)
	}
	return cfg
}

// TestWorstCaseRefused: a job whose worst case reaches a window is refused,
// naming the keys and the numbers, on every broker kind.
func TestWorstCaseRefused(t *testing.T) {
	const long = "job.timeout=30s" // 4m19.2s with the default retries
	tests := []struct {
		name string
		sets []string
		want []string // what the error says; none = accepted
	}{
		{"defaults amqp", nil, nil},
		{"defaults nats", []string{"broker.kind=nats"}, nil},
		{"defaults redisstream", []string{"broker.kind=redisstream"}, nil},
		{"defaults gochannel", []string{"broker.kind=gochannel"}, nil},
		{"amqp long timeout", []string{long},
			[]string{"worst case 4m19.2s", "job.timeout 30s × 6 attempts", "backoff 14.2s via job.retry.*", "job.offline_grace 30s", "broker.amqp.redeliver_after 2m0s", "raise broker.amqp.redeliver_after above 4m19.2s", "cloud.dedupe_ttl 2m0s"}},
		{"nats long timeout", []string{long, "broker.kind=nats"},
			[]string{"worst case 4m19.2s", "broker.nats.redeliver_after 2m0s", "raise broker.nats.redeliver_after above 4m19.2s", "cloud.dedupe_ttl 2m0s"}},
		{"redisstream long timeout", []string{long, "broker.kind=redisstream"},
			[]string{"worst case 4m19.2s", "broker.redisstream.redeliver_after 2m0s", "cloud.dedupe_ttl 2m0s"}},
		{"gochannel long timeout", []string{long, "broker.kind=gochannel"},
			[]string{"worst case 4m19.2s", "cloud.dedupe_ttl 2m0s"}},
		{"nats window raised, cloud too", []string{long, "broker.kind=nats", "broker.nats.redeliver_after=5m", "cloud.dedupe_ttl=5m"}, nil},
		{"nats window short", []string{"broker.kind=nats", "broker.nats.redeliver_after=1m"},
			[]string{"worst case 1m49.2s", "broker.nats.redeliver_after 1m0s"}},
		{"redisstream window short", []string{"broker.kind=redisstream", "broker.redisstream.redeliver_after=1m"},
			[]string{"worst case 1m49.2s", "broker.redisstream.redeliver_after 1m0s"}},
		{"amqp ignores the nats window", []string{"broker.nats.redeliver_after=1m"}, nil},
		{"long offline grace", []string{"job.offline_grace=5m"}, []string{"job.offline_grace 5m0s", "cloud.dedupe_ttl"}},
		// 1000 bundles of 256 at 12,800 a second: 20 s.
		{"throttle counts on nats", []string{"job.throttle=12800", "broker.kind=nats"}, []string{"worst case 2m9.2s", "20s waiting for job.throttle", "broker.nats.redeliver_after 2m0s", "raise job.throttle"}},
		// Handling 1m49.2s, with the throttle 1m53.2s.
		{"throttle does not count for cloud", []string{"job.throttle=256", "broker.kind=redisstream", "cloud.dedupe_ttl=1m51s"}, nil},
		{"job dedupe below the nats window", []string{"broker.kind=nats", "job.dedupe.ttl=1m50s"},
			[]string{"job.dedupe.ttl: 1m50s is not above broker.nats.redeliver_after (2m0s)"}},
		{"amqp window short", []string{"broker.amqp.redeliver_after=1m"},
			[]string{"worst case 1m49.2s", "broker.amqp.redeliver_after 1m0s"}},
		{"job dedupe below the worst case", []string{"job.dedupe.ttl=1m", "broker.kind=gochannel"},
			[]string{"job.dedupe.ttl: 1m0s is not above job's worst case on one message (1m49.2s)"}},
		{"throttle past a million a second", []string{"job.throttle=2000000000"}, []string{"job.throttle", "1000000"}},
		{"job dedupe off", []string{"job.dedupe.enabled=false", "job.dedupe.ttl=1m"}, nil},
		// Cloud nodes configured apart from job are not checked: their
		// job is, with the cloud.dedupe_ttl its own file states.
		{"cloud alone", []string{long, "stages=cloud", "broker.kind=nats"}, nil},
		{"logic alone", []string{long, "stages=logic", "broker.kind=nats"}, nil},
		{"job alone", []string{long, "stages=job", "broker.kind=nats"}, []string{"broker.nats.redeliver_after 2m0s", "cloud.dedupe_ttl 2m0s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(Sources{Sets: tt.sets, Defaults: withSecret})
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Load: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Load succeeded, want an error saying %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}
