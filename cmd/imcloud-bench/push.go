package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// pushConfig drives the HTTP push API.
type pushConfig struct {
	API         string // logic's HTTP address, host:port
	APIKey      string
	Concurrency int
	Duration    time.Duration
	// Route is the push path and query, e.g. /im/push/room?operation=1000&type=live&room=1.
	Route string
}

// pushResult is what the push mode measured.
type pushResult struct {
	Requests    int64       `json:"requests"`
	Failed      int64       `json:"failed"`
	PerSecond   float64     `json:"requests_per_second"`
	LatencyMs   percentiles `json:"latency_ms"`
	Concurrency int         `json:"concurrency"`
	Seconds     float64     `json:"seconds"`
}

// push sends pushes from Concurrency workers for Duration.
func push(ctx context.Context, c pushConfig, progress io.Writer) (pushResult, error) {
	if err := loopbackOnly(c.API); err != nil {
		return pushResult{}, err
	}
	target := "http://" + c.API + c.Route
	if _, err := url.Parse(target); err != nil {
		return pushResult{}, fmt.Errorf("route %q: %w", c.Route, err)
	}
	// fasthttp rather than net/http: the load generator shares the cores
	// with the server it measures, and net/http's client (two goroutines
	// and a request allocation per call) cost a third of the throughput
	// that wrk reaches on the same server.
	client := &fasthttp.HostClient{Addr: c.API, MaxConns: c.Concurrency}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, c.Duration)
	defer cancel()
	var ok, failed atomic.Int64
	var lat latencies
	stop := make(chan struct{})
	go ticker(progress, stop, func(e time.Duration) string {
		return fmt.Sprintf("push %s: %d ok, %d failed", e, ok.Load(), failed.Load())
	})
	start := time.Now()
	var wg sync.WaitGroup
	for range c.Concurrency {
		wg.Go(func() {
			var mine []time.Duration
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			req.SetRequestURI(target)
			req.Header.SetMethod(http.MethodPost)
			req.Header.Set("Authorization", "Bearer "+c.APIKey)
			req.SetBodyString("bench")
			for ctx.Err() == nil {
				t0 := time.Now()
				if err := client.DoTimeout(req, resp, 30*time.Second); err != nil {
					if ctx.Err() == nil {
						failed.Add(1)
					}
					continue
				}
				if resp.StatusCode() != http.StatusOK {
					failed.Add(1)
					continue
				}
				mine = append(mine, time.Since(t0))
				ok.Add(1)
			}
			lat.AddAll(mine)
		})
	}
	wg.Wait()
	close(stop)
	secs := time.Since(start).Seconds()
	return pushResult{
		Requests: ok.Load(), Failed: failed.Load(), PerSecond: float64(ok.Load()) / secs,
		LatencyMs: lat.percentiles(), Concurrency: c.Concurrency, Seconds: secs,
	}, nil
}

// Print writes the summary table.
func (r pushResult) Print(w io.Writer) {
	table(w, [][2]string{
		{"mode", "push"},
		{"concurrency", fmt.Sprint(r.Concurrency)},
		{"requests ok", fmt.Sprint(r.Requests)},
		{"failed", fmt.Sprint(r.Failed)},
		{"requests/s", fmt.Sprintf("%.0f", r.PerSecond)},
		{"latency p50/p90/p99/p99.9 ms", fmt.Sprintf("%.2f / %.2f / %.2f / %.2f", r.LatencyMs.P50, r.LatencyMs.P90, r.LatencyMs.P99, r.LatencyMs.P999)},
	})
}
