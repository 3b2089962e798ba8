package process

import (
	"slices"
	"testing"

	"imcloud/pipeline"
)

// TestUnreadShards: the shards of n that no job's list names; a job's list
// from another process is input, so odd entries are ignored.
func TestUnreadShards(t *testing.T) {
	for _, tc := range []struct {
		n    int
		jobs []string
		want []int
	}{
		{4, nil, []int{0, 1, 2, 3}},
		{4, []string{"0,1"}, []int{2, 3}},
		{4, []string{"0,1", "2,3"}, nil},
		{4, []string{"0,1,2,3", "1"}, nil},
		{1, []string{"0"}, nil},
		{3, []string{"-1,9,x,,1"}, []int{0, 2}},
	} {
		var jobs []pipeline.Agreed
		for _, v := range tc.jobs {
			jobs = append(jobs, pipeline.Agreed{Value: v, Member: "job"})
		}
		if got := unreadShards(tc.n, jobs); !slices.Equal(got, tc.want) {
			t.Errorf("unreadShards(%d, %v) = %v, want %v", tc.n, tc.jobs, got, tc.want)
		}
	}
}
