package main

import (
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"text/tabwriter"
	"time"
)

// latencies collects samples from many goroutines.
type latencies struct {
	mu      sync.Mutex
	samples []time.Duration
}

// Add records one sample.
func (l *latencies) Add(d time.Duration) {
	l.mu.Lock()
	l.samples = append(l.samples, d)
	l.mu.Unlock()
}

// AddAll records a goroutine's batch of samples.
func (l *latencies) AddAll(ds []time.Duration) {
	l.mu.Lock()
	l.samples = append(l.samples, ds...)
	l.mu.Unlock()
}

// millis returns the samples in milliseconds.
func (l *latencies) millis() []float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]float64, len(l.samples))
	for i, d := range l.samples {
		out[i] = float64(d) / float64(time.Millisecond)
	}
	return out
}

// percentilesOf summarises samples given in milliseconds.
func percentilesOf(ms []float64) percentiles {
	if len(ms) == 0 {
		return percentiles{}
	}
	slices.Sort(ms)
	at := func(q float64) float64 { return ms[int(q*float64(len(ms)-1))] }
	return percentiles{P50: at(0.5), P90: at(0.9), P99: at(0.99), P999: at(0.999), Max: at(1)}
}

// percentiles of the samples, in milliseconds.
type percentiles struct {
	P50, P90, P99, P999, Max float64
}

// percentiles computes the summary.
func (l *latencies) percentiles() percentiles {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.samples) == 0 {
		return percentiles{}
	}
	slices.Sort(l.samples)
	at := func(q float64) float64 {
		return float64(l.samples[int(q*float64(len(l.samples)-1))]) / float64(time.Millisecond)
	}
	return percentiles{P50: at(0.5), P90: at(0.9), P99: at(0.99), P999: at(0.999), Max: at(1)}
}

// table prints rows of name/value pairs aligned.
func table(w io.Writer, rows [][2]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", r[0], r[1])
	}
	_ = tw.Flush()
}

// loopbackOnly refuses targets that are not on this machine: the tool
// generates load, and must not be pointed at someone else's server.
func loopbackOnly(hostport string) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return fmt.Errorf("target %q: %w", hostport, err)
	}
	ips, err := net.LookupIP(host)
	if err != nil {
		return fmt.Errorf("target %q: %w", hostport, err)
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return fmt.Errorf("target %q is not a loopback address: imcloud bench only loads this machine", hostport)
		}
	}
	return nil
}

// ticker prints progress every second until stop is closed.
func ticker(w io.Writer, stop <-chan struct{}, line func(elapsed time.Duration) string) {
	start := time.Now()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			fmt.Fprintln(w, line(time.Since(start).Round(time.Second)))
		}
	}
}
