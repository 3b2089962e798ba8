package main

import (
	"bytes"
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
	// Batch, when above 0, sends POST /im/push/batch requests of Batch
	// room pushes each (NDJSON) instead of Route.
	Batch int
}

// pushResult is what the push mode measured.
type pushResult struct {
	Requests  int64   `json:"requests"`
	Failed    int64   `json:"failed"`
	PerSecond float64 `json:"requests_per_second"`
	// Batch is the pushes per request (1: single pushes); a batch counts
	// as failed unless every push in it was accepted.
	Batch           int         `json:"batch"`
	PushesPerSecond float64     `json:"pushes_per_second"`
	LatencyMs       percentiles `json:"latency_ms"`
	Concurrency     int         `json:"concurrency"`
	Seconds         float64     `json:"seconds"`
}

// push sends pushes from Concurrency workers for Duration.
func push(ctx context.Context, c pushConfig, progress io.Writer) (pushResult, error) {
	if err := loopbackOnly(c.API); err != nil {
		return pushResult{}, err
	}
	route, body := c.Route, []byte("bench")
	if c.Batch > 0 {
		route, body = "/im/push/batch", batchBody(c.Batch)
	}
	target := "http://" + c.API + route
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
			req.SetBody(body)
			if c.Batch > 0 {
				req.Header.SetContentType("application/x-ndjson")
			}
			for ctx.Err() == nil {
				t0 := time.Now()
				if err := client.DoTimeout(req, resp, 30*time.Second); err != nil {
					if ctx.Err() == nil {
						failed.Add(1)
					}
					continue
				}
				if resp.StatusCode() != http.StatusOK || (c.Batch > 0 && !bytes.Contains(resp.Body(), []byte(`"failed":0,`))) {
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
	batch := max(c.Batch, 1)
	return pushResult{
		Requests: ok.Load(), Failed: failed.Load(), PerSecond: float64(ok.Load()) / secs,
		Batch: batch, PushesPerSecond: float64(ok.Load()*int64(batch)) / secs,
		LatencyMs: lat.percentiles(), Concurrency: c.Concurrency, Seconds: secs,
	}, nil
}

// batchBody is a batch of n room pushes, spread over 16 rooms so that
// their positions are not all taken in one stream.
func batchBody(n int) []byte {
	var b bytes.Buffer
	for i := range n {
		fmt.Fprintf(&b, `{"type":"live","room":"bench%d","operation":1000,"msg":"bench"}`+"\n", i%16)
	}
	return b.Bytes()
}

// Print writes the summary table.
func (r pushResult) Print(w io.Writer) {
	table(w, [][2]string{
		{"mode", "push"},
		{"concurrency", fmt.Sprint(r.Concurrency)},
		{"requests ok", fmt.Sprint(r.Requests)},
		{"failed", fmt.Sprint(r.Failed)},
		{"requests/s", fmt.Sprintf("%.0f", r.PerSecond)},
		{"pushes per request", fmt.Sprint(r.Batch)},
		{"pushes/s", fmt.Sprintf("%.0f", r.PushesPerSecond)},
		{"latency p50/p90/p99/p99.9 ms", fmt.Sprintf("%.2f / %.2f / %.2f / %.2f", r.LatencyMs.P50, r.LatencyMs.P90, r.LatencyMs.P99, r.LatencyMs.P999)},
	})
}
